"""``prefix_tree_approx``: the peers' cache-aware routing, for comparison.

The SGLang router's ``cache_aware`` policy (and, close to it, Ray Serve LLM's
``PrefixCacheAffinityRouter``): remember which prompts were sent to which replica, and

    1. if the load is imbalanced (max - min > ``balance_abs`` and max > ``balance_rel`` *
       min, load = running + waiting requests): send to the least loaded replica;
    2. else, if some replica has seen at least ``cache_threshold`` of this prompt: send to
       the one that has seen the longest prefix;
    3. else: send to the replica that has seen the least (the smallest tree).

SGLang's tree is over characters and Ray's over text; this one is over the same chunk keys
as the store (a chain of keys is a path in a prefix tree), which only sharpens the match.
It knows nothing of the store or of the replicas' speed: that is the difference being
measured. Replica trees are LRU-bounded (``max_chunks`` over all replicas).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from kvstore.messages import ReplicaLoad
from router.index.owners import OwnerIndex
from router.policy.interface import Candidate, RouteDecision, RoutingPolicy, RoutingRequest, best_then_rest
from router.policy.simple import LeastLoadedPolicy


class PrefixTreeApproxPolicy(RoutingPolicy):
    name = "prefix_tree_approx"
    TERMS = ("matched_chunks", "load", "tree_chunks")

    def __init__(self, role: str = "", rng: random.Random | None = None, cache_threshold: float = 0.5,
                 balance_abs: int = 32, balance_rel: float = 1.0001, max_chunks: int = 1_000_000) -> None:
        self.role = role
        self.cache_threshold, self.balance_abs, self.balance_rel = cache_threshold, balance_abs, balance_rel
        self._trees = OwnerIndex(max_chunks)
        self._sizes: dict[str, int] = {}
        self._rng = rng or random.Random()
        self._fallback = LeastLoadedPolicy(role, self._rng)

    def route(self, request: RoutingRequest | None, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        if request is None or request.role != "prefill" or not replicas or not request.chunk_keys:
            return self._renamed(self._fallback.route(request, replicas), "load")
        depths = self._trees.prefix_depths(request.chunk_keys)
        sizes = self._sizes
        cands: list[Candidate] = [
            (r.replica, -depths.get(r.replica, 0),
             (depths.get(r.replica, 0), r.running + r.waiting, sizes.get(r.replica, 0))) for r in replicas]
        loads = [c[2][1] for c in cands]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            best, why = self._rng.choice([c[0] for c in cands if c[2][1] == lo]), "balance"
        else:
            top = min(c[1] for c in cands)
            if -top / len(request.chunk_keys) >= self.cache_threshold:
                best, why = self._rng.choice([c[0] for c in cands if c[1] == top]), "cache"
            else:
                best, why = min(cands, key=lambda c: (c[2][2], c[2][1]))[0], "smallest tree"
        self._insert(best, request.chunk_keys)
        return RouteDecision(self.name, request.role, best_then_rest(best, [c[0] for c in cands]), why, cands,
                             self.TERMS)

    def _insert(self, replica: str, keys: Sequence[bytes]) -> None:
        """Like SGLang: the tree grows at routing time, before the replica has computed it."""
        self._sizes[replica] = self._sizes.get(replica, 0) + self._trees.add(replica, keys)

    def _renamed(self, d: RouteDecision, why: str) -> RouteDecision:
        return RouteDecision(self.name, d.role, d.groups, why, d.candidates, d.term_names)
