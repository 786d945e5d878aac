"""Serve's request-router extension point, bound to pdserve's ``RoutingPolicy``.

Configured on the prefill and decode deployments by the control plane (as the import path
``router.replica_router:PDRequestRouter``); Serve instantiates it inside whichever process
holds the deployment handle, i.e. the router replica. Replica loads come from the workers'
``record_routing_stats`` (refreshed every ``request_routing_stats_period_s``) plus Serve's
own cache of each replica's queue length, which is fresher.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from kvstore.messages import ReplicaLoad
from router.policy import RoutingPolicy, RoutingRequest, make_policy


class PDRequestRouter(FIFOMixin, RequestRouter):  # type: ignore[misc]
    def initialize_state(self, policy: str = "least_loaded", **kwargs: Any) -> None:
        self._policy: RoutingPolicy = make_policy(policy)

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        stats = replica.routing_stats or {}
        queued = self._replica_queue_len_cache.get(replica.replica_id)
        return ReplicaLoad(
            replica=replica.replica_id.unique_id,
            node_id=str(replica.node_id or stats.get("node_id", "")),
            running=int(stats.get("running", 0)),
            waiting=int(stats.get("waiting", 0)),
            kv_usage=float(stats.get("kv_usage", 0.0)),
            inflight=int(queued if queued is not None else stats.get("inflight", 0)),
        )

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        hint = None
        if pending_request is not None:
            raw = pending_request.kwargs.get("routing")
            if isinstance(raw, bytes):
                hint = RoutingRequest.decode(raw)
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = self._policy.rank(hint, [self._load(r) for r in candidate_replicas])
        return [[by_name[name] for name in group if name in by_name] for group in ranked]
