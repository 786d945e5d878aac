"""Serve's request-router extension point, bound to pdserve's ``RoutingPolicy``.

Configured on the prefill and decode deployments by the control plane (as the import path
``router.replica_router:PDRequestRouter``); Serve instantiates it inside whichever process
holds the deployment handle, i.e. the router replica, where the ingress has installed the
process's ``RoutingState``. Replica loads come from the workers' ``record_routing_stats``
(refreshed every ``request_routing_stats_period_s``) plus Serve's own cache of each
replica's queue length, which is fresher.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from kvstore.logging import get_logger
from kvstore.messages import ReplicaLoad
from router.policy import RoutingPolicy, RoutingRequest, RoutingState, make_policy
from router.policy import state as routing_state

log = get_logger(__name__)


class PDRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, policy: str = "kv_aware", role: str = "", **kwargs: Any) -> None:
        self._role, self._policy_name = role, policy
        # replica -> (the stats dict it came from, Serve's queue length, the load): a load is
        # rebuilt only when either changed (stats refresh every period; queue length per call).
        self._loads: dict[str, tuple[object, int | None, ReplicaLoad]] = {}
        self._state: RoutingState | None = None
        self._policy: RoutingPolicy = make_policy(policy, None, role)
        self._bind_state()

    def _bind_state(self) -> None:
        """Take the process's routing state once the ingress has installed it. Serve may build
        this router while the ingress's constructor is still running (handles passed to it are
        initialised eagerly), so the state can appear after ``initialize_state``: until then
        kv_aware routes by load."""
        state = routing_state.current()
        if state is None:
            return
        self._state = state
        self._policy = make_policy(self._policy_name, state, self._role)
        state.watch_pool(self._role, self.pool_loads)  # the dashboard reads the pool between requests too

    def pool_loads(self) -> list[ReplicaLoad]:
        """Every replica's latest report (Serve refreshes them in the background)."""
        return [self._load(r, []) for r in list(self.curr_replicas.values())]

    def _load(self, replica: RunningReplica, changed: list[ReplicaLoad]) -> ReplicaLoad:
        stats = replica.routing_stats or {}
        queued = self._replica_queue_len_cache.get(replica.replica_id)
        cached = self._loads.get(replica.replica_id.unique_id)
        if cached is not None and cached[0] is stats and cached[1] == queued:
            return cached[2]
        load = ReplicaLoad(
            replica=replica.replica_id.unique_id,
            node_id=str(replica.node_id or stats.get("node_id", "")),
            running=int(stats.get("running", 0)),
            waiting=int(stats.get("waiting", 0)),
            kv_usage=float(stats.get("kv_usage", 0.0)),
            inflight=int(queued if queued is not None else stats.get("inflight", 0)),
            queued_tokens=int(stats.get("queued_tokens", 0)),
            computed_tokens=int(stats.get("computed_tokens", 0)),
            busy_s=float(stats.get("busy_s", 0.0)),
            kv_events=str(stats.get("kv_events", "")),
            prompt_tokens=int(stats.get("prompt_tokens", 0)),
            cached_tokens=int(stats.get("cached_tokens", 0)),
            generated_tokens=int(stats.get("generated_tokens", 0)),
        )
        self._loads[load.replica] = (stats, queued, load)
        changed.append(load)
        return load

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if self._state is None:
            self._bind_state()
        hint = None
        if pending_request is not None:
            raw = pending_request.kwargs.get("routing")
            if isinstance(raw, bytes):
                hint = RoutingRequest.decode(raw)
        changed: list[ReplicaLoad] = []
        loads = [self._load(r, changed) for r in candidate_replicas]
        if len(self._loads) != len(loads):  # a replica left: drop its cached load
            live = {load.replica for load in loads}
            self._loads = {name: v for name, v in self._loads.items() if name in live}
            changed = changed or loads[:1]  # membership changed: let the state see it
        if self._state is not None:
            self._state.settle()  # earlier decisions' bookkeeping, if the loop has not run it yet
            if changed:
                self._state.observe(self._role, loads, changed)
        decision = self._policy.route(hint, loads)
        if hint is not None and self._state is not None:
            self._state.routed(hint, decision)
            # The rest of its bookkeeping once the request has gone out, not in its wait
            # (RoutingState.settle).
            asyncio.get_running_loop().call_soon(self._state.settle)
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_name[name] for name in group if name in by_name] for group in decision.groups]
