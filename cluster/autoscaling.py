"""Per-role autoscaling: prefill and decode scale independently, each on what limits it.

Serve's default autoscaler counts requests in flight, which says little here: one prefill
request may be 50 tokens or 5,000, and a decode replica with 40 short streams may have
room while one with 10 long ones is out of KV cache. So each pool gets its own policy,
fed by the replicas' ``record_autoscaling_stats`` (``kvstore.messages.scaling_stats``):

    prefill  desired = replicas x queued seconds / target_queue_s
             queued seconds of a replica = prompt tokens waiting for their first token
             / its measured prefill rate: the wait a new prompt would see there (TTFT)
    decode   desired = replicas x max(inflight / target_inflight, kv_usage / target_kv_usage)
             sequences streaming, and the KV cache they hold (a full cache preempts)

Serve wraps each policy with the pool's bounds and delays (``min_replicas``,
``max_replicas``, ``upscale_delay_s``, ``downscale_delay_s``). Scaling down drains: Serve
stops routing to the replica it picked, waits for its requests to finish (up to the
pool's ``graceful_shutdown_timeout_s``), then stops it; the KV it saved lives in its node's
store agent, not in the replica, so it stays usable. A pool that needs more resources than
the cluster has waits for Ray's autoscaler to add a node of a type that offers them (the
pools' ``resources`` pin them to prefill-heavy or decode-heavy node types).

The policies run in Serve's controller; Serve imports them by path and builds each with its
keyword arguments (``deployment_options``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cluster.config import PoolConfig, ScalingConfig
from kvstore.messages import SCALING_INFLIGHT, SCALING_KV_USAGE, SCALING_PREFILL_TPS, SCALING_QUEUED_TOKENS

_ROLE_POLICY = {"prefill": "cluster.autoscaling:PrefillScaling", "decode": "cluster.autoscaling:DecodeScaling"}


def _mean(per_replica: Mapping[Any, float] | None, replicas: list[Any]) -> float | None:
    """The mean over the running replicas that reported the metric; None if none did yet."""
    if not per_replica:
        return None
    values = [per_replica[r] for r in replicas if r in per_replica]
    return sum(values) / len(values) if values else None


class PrefillScaling:
    """Prefill: hold each replica's queued prompt work near ``target_queue_s`` seconds."""

    def __init__(self, target_queue_s: float, prior_tps: float) -> None:
        self.target_queue_s, self.prior_tps = target_queue_s, prior_tps

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        replicas = list(ctx.running_replicas)
        queued = _mean(metrics.get(SCALING_QUEUED_TOKENS), replicas)
        if queued is None or not replicas:  # nothing reported yet: stay
            return ctx.target_num_replicas, {}
        tps = _mean(metrics.get(SCALING_PREFILL_TPS), replicas) or self.prior_tps
        queue_s = queued / tps
        return len(replicas) * queue_s / self.target_queue_s, {"queue_s": round(queue_s, 3)}


class DecodeScaling:
    """Decode: hold sequences in flight and KV usage per replica near their targets."""

    def __init__(self, target_inflight: float, target_kv_usage: float) -> None:
        self.target_inflight, self.target_kv_usage = target_inflight, target_kv_usage

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        replicas = list(ctx.running_replicas)
        inflight = _mean(metrics.get(SCALING_INFLIGHT), replicas)
        if inflight is None or not replicas:
            return ctx.target_num_replicas, {}
        kv = _mean(metrics.get(SCALING_KV_USAGE), replicas) or 0.0
        pressure = max(inflight / self.target_inflight, kv / self.target_kv_usage)
        return len(replicas) * pressure, {"inflight": round(inflight, 2), "kv_usage": round(kv, 3)}


def deployment_options(role: str, pool: PoolConfig, prior_tps: float) -> dict[str, Any]:
    """``serve.deployment`` keyword arguments for a pool's size: fixed replicas, or Serve's
    autoscaler with this role's policy."""
    a: ScalingConfig | None = pool.autoscaling
    if a is None:
        return {"num_replicas": pool.replicas}
    kwargs: dict[str, float] = (
        {"target_queue_s": a.target_queue_s, "prior_tps": prior_tps} if role == "prefill"
        else {"target_inflight": a.target_inflight, "target_kv_usage": a.target_kv_usage}
    )
    return {"autoscaling_config": {
        "min_replicas": a.min_replicas, "max_replicas": a.max_replicas, "initial_replicas": pool.replicas,
        "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
        "look_back_period_s": a.look_back_period_s,
        "policy": {"policy_function": _ROLE_POLICY[role], "policy_kwargs": kwargs},
    }}
