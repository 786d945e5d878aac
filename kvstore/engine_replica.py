"""The Serve-facing shell both engine roles share: build the engine for this replica, report
its load to the request router, answer health checks, shut the engine down cleanly.

Light on purpose (no vLLM at import time): the control plane imports the worker classes to
build the app. The role is only a name here; what a role does is its subclass's one method.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ray import serve

from kvstore.messages import EngineSpec, scaling_stats

if TYPE_CHECKING:
    from kvstore.engine_host import EngineHost


class EngineReplica:
    role = "engine"

    def __init__(self, spec: dict[str, Any]) -> None:
        from kvstore.engine_host import EngineHost  # data plane: imports vLLM

        ctx = serve.get_replica_context()
        rank = ctx.rank.local_rank if ctx.rank is not None else 0
        # The request router knows this replica by its Serve tag: its KV events carry that name.
        self.host: EngineHost = EngineHost(EngineSpec(**spec), f"{self.role}-{ctx.replica_tag}", rank,
                                           events_topic=ctx.replica_tag)

    def record_routing_stats(self) -> dict[str, Any]:
        """Called by Serve every request_routing_stats_period_s; read by PDRequestRouter."""
        return asdict(self.host.load())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Called by Serve on its metrics period when the pool autoscales; read by the
        pool's policy in ``cluster.autoscaling`` (queued prompt work for prefill, sequences
        and KV usage for decode)."""
        return scaling_stats(self.host.load())

    async def reset_prefix_cache(self) -> bool:
        return await self.host.reset_prefix_cache()

    async def check_health(self) -> None:
        await self.host.check_health()

    def __del__(self) -> None:
        # Serve calls this on graceful replica shutdown: stop the engine before the process
        # goes, or its shared-memory queues outlive it.
        host = getattr(self, "host", None)
        if host is not None:
            host.shutdown()
