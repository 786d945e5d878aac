"""Routing policies behind one contract (``interface.RoutingPolicy``), chosen by name in the
config (``router.policy``):

    round_robin         no information: the floor
    least_loaded        the replicas' load reports
    prefix_tree_approx  the SGLang / Ray Serve LLM style: what was sent where, plus load
    kv_aware            (default) estimated time to first token with every cache counted
"""

from __future__ import annotations

import random

from router.policy.interface import RouteDecision, RoutingPolicy, RoutingRequest, ScoredReplica
from router.policy.kv_aware import KVAwarePolicy
from router.policy.prefix_tree import PrefixTreeApproxPolicy
from router.policy.simple import LeastLoadedPolicy, RoundRobinPolicy
from router.policy.state import RoutingState

POLICIES = ("round_robin", "least_loaded", "prefix_tree_approx", "kv_aware")


def make_policy(name: str, state: RoutingState | None, role: str = "",
                rng: random.Random | None = None) -> RoutingPolicy:
    """The policy ``name`` for one pool. ``kv_aware`` needs the process's routing state;
    without one (a handle used outside a router replica) it routes by load."""
    if name == "round_robin":
        return RoundRobinPolicy(role)
    if name == "least_loaded":
        return LeastLoadedPolicy(role, rng)
    if name == "prefix_tree_approx":
        return PrefixTreeApproxPolicy(role, rng)
    if name == "kv_aware":
        return KVAwarePolicy(state, role, rng) if state is not None else LeastLoadedPolicy(role, rng)
    raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(POLICIES)}")


__all__ = [
    "POLICIES", "KVAwarePolicy", "LeastLoadedPolicy", "PrefixTreeApproxPolicy", "RoundRobinPolicy",
    "RouteDecision", "RoutingPolicy", "RoutingRequest", "RoutingState", "ScoredReplica", "make_policy",
]
