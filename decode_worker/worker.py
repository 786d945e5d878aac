"""Decode replica: gets prompt + first token, loads the prompt's KV from the store through
the connector (computing only the short tail), and streams the remaining tokens.

A Serve deployment class; the control plane wraps it with ``serve.deployment`` and its pool
options. vLLM is imported when the replica starts, never when this module is imported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from ray import serve

from kvstore.messages import EngineRequest, EngineSpec


class DecodeWorker:
    def __init__(self, spec: dict[str, Any]) -> None:
        from kvstore.engine_host import EngineHost  # data plane: imports vLLM

        ctx = serve.get_replica_context()
        rank = ctx.rank.local_rank if ctx.rank is not None else 0
        self.host = EngineHost(EngineSpec(**spec), f"decode-{ctx.replica_tag}", rank)

    async def decode(self, payload: bytes, routing: bytes | None = None) -> AsyncIterator[bytes]:
        """Stream encoded EngineDeltas. Cancelling the stream aborts the engine request."""
        async for delta in self.host.generate(EngineRequest.decode(payload)):
            yield delta.encode()

    def record_routing_stats(self) -> dict[str, Any]:
        return asdict(self.host.load())

    async def reset_prefix_cache(self) -> bool:
        return await self.host.reset_prefix_cache()

    async def check_health(self) -> None:
        await self.host.check_health()

    def __del__(self) -> None:
        host = getattr(self, "host", None)
        if host is not None:
            host.shutdown()
