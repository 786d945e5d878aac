"""Which prefill replicas ``kv_aware`` scores: every one in a small pool; in a large one the
deepest warm replicas and a sample of the cold ones.

A replica whose own engine cache holds part of the prompt ("warm") is scored ahead of the
rest, the deepest first. Warm replicas whose caches go equally deep differ only by load and
rate, as cold ones do: when more than ``warm`` of them hold a prefix (a hot system prompt
sits in nearly every cache), the deepest ``warm`` are scored, and at the shallowest depth
that makes the cut a random draw of that depth's replicas. bench.router's 64-replica pool
drifts there: the other policies spread the shared prefixes until a prompt's warm set is
about 30 replicas, and scoring all of them doubled the decision (p50 32 -> 51 us).

Every other replica ("cold") differs from the rest only by its queued work, its rate and its
node's store discount, so a few of them stand for all. Above ``exact_up_to`` replicas the
policy scores, besides the warm ones:

    node    two neighbouring members, from a random one, of each of the ``nodes`` nodes
            whose store holds the deepest prefix of the prompt (the store discount favours
            them)
    drawn   about ``d`` replicas at evenly spaced pool positions from a random offset
            (systematic sampling: one draw, every replica equally likely to be in it)

    pool positions:  0 1 2 ... 16 17 18 ... 32 33 34 ... 48 49 ...   d = 4 of 64: step 16
    drawn:             ^          ^            ^            ^        offset 1: 1, 17, 33, 49
    scored:          warm + node + drawn, each once, the warm ones first

The least loaded of a few random replicas is nearly as good as the least loaded of all
(power of d choices); the simulator at 64 and 512 replicas checks that this holds for
kv_aware's score (README, "Routing policies"). There four draws and two nodes routed as
well as eight and four, and keeping the best cold candidates of one decision for the next
(power of d with memory) made no difference, so the sampler keeps nothing between
decisions. The draws come from the policy's rng, so a seeded policy decides the same way
every run.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from itertools import islice


class ColdSampler:
    def __init__(self, rng: random.Random, exact_up_to: int = 16, d: int = 4, nodes: int = 2,
                 warm: int = 8) -> None:
        self._random = rng.random
        self.exact_up_to, self.d, self.nodes, self.warm_cap = exact_up_to, d, nodes, warm

    def samples(self, pool_size: int) -> bool:
        return pool_size > self.exact_up_to

    def warm(self, own_depth: dict[str, int], members: Mapping[str, int]) -> list[tuple[str, int]]:
        """The warm replicas of the pool (``members``) to score, as (name, depth), shallowest
        first: every one when they are few, else the ``warm`` deepest, those at the depth
        where the cut falls drawn at random (evenly spaced from a random offset).
        ``own_depth`` is in order of depth, shallowest first (``OwnerIndex.prefix_depths``)."""
        items = [(name, depth) for name, depth in own_depth.items() if name in members]
        cap = self.warm_cap
        if len(items) <= cap:
            return items
        cut = items[len(items) - cap][1]
        hi = len(items)
        while items[hi - 1][1] > cut:
            hi -= 1
        lo = hi - 1
        while lo > 0 and items[lo - 1][1] == cut:
            lo -= 1
        need = cap - (len(items) - hi)
        step = (hi - lo) / need
        start = self._random() * step
        return [items[lo + int(start + k * step)] for k in range(need)] + items[hi:]

    def positions(self, warm: Iterable[int], pool_size: int, node_depth: dict[str, int],
                  by_node: Mapping[str, list[int]]) -> list[int]:
        """The pool positions to score, ``warm`` first, each once. ``node_depth`` is in order
        of depth, shallowest first (``OwnerIndex.prefix_depths``)."""
        rand = self._random
        picks = list(warm)
        for node in islice(reversed(node_depth), self.nodes):
            members = by_node.get(node)
            if members:
                at = int(rand() * len(members))
                picks += members[at - 1], members[at]  # at 0, -1 wraps to the last one
        step = max(pool_size // self.d, 1)
        picks += range(int(rand() * step), pool_size, step)
        return list(dict.fromkeys(picks))  # drops repeats, keeps the first (warm ones lead)
