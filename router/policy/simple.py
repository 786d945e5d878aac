"""The floor policies: ``round_robin`` (no information at all) and ``least_loaded`` (the
replicas' load reports only)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from kvstore.messages import ReplicaLoad
from router.policy.interface import Candidate, RouteDecision, RoutingPolicy, RoutingRequest, best_then_rest


def load_score(load: ReplicaLoad) -> float:
    """Requests in flight at the replica (Serve's own count: exact, updated on every send and
    completion) plus KV usage (a full cache is one more request's worth). The engine's
    running/waiting counts are not added: they arrive every stats period, so they are up to
    a period old and count the same requests again (the simulator showed them herding load
    onto replicas that last reported idle)."""
    return load.inflight + load.kv_usage


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self, role: str = "") -> None:
        self.role = role
        self._turn = 0

    def route(self, request: RoutingRequest | None, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        role = request.role if request else self.role
        if not replicas:
            return RouteDecision(self.name, role, [])
        names = sorted(r.replica for r in replicas)  # a stable order as replicas come and go
        best = names[self._turn % len(names)]
        self._turn += 1
        return RouteDecision(self.name, role, best_then_rest(best, names), "turn", [(best, 0.0, ())])


class LeastLoadedPolicy(RoutingPolicy):
    """Lowest ``load_score`` first; ties broken at random so equal replicas share the load
    (running and waiting are shown in the explanation, not scored)."""

    name = "least_loaded"
    TERMS = ("running", "waiting", "inflight", "kv_usage")

    def __init__(self, role: str = "", rng: random.Random | None = None) -> None:
        self.role = role
        self._rng = rng or random.Random()

    def route(self, request: RoutingRequest | None, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        role = request.role if request else self.role
        if not replicas:
            return RouteDecision(self.name, role, [])
        cands: list[Candidate] = [(r.replica, r.inflight + r.kv_usage,
                                   (r.running, r.waiting, r.inflight, r.kv_usage)) for r in replicas]
        low = min(c[1] for c in cands)
        best = self._rng.choice([c[0] for c in cands if c[1] == low])
        return RouteDecision(self.name, role, best_then_rest(best, [c[0] for c in cands]), "load", cands,
                             self.TERMS)
