"""``kv_aware`` (the default): each replica scored by when this request would get its first
token there, with every cache in the cluster counted at what it is worth.

Prefill, for replica r and a prompt of n tokens (chunk keys k1..km):

    own     = leading tokens in r's own engine cache                    (free)
    node    = next leading tokens in the store on r's node              (shared-memory load)
    remote  = next leading tokens in the store on other nodes           (network pull)
    compute = n - own - node - remote                                   (at least 1 token)

    ttft(r) = queued(r) / rate(r) + compute / rate(r)
              + node * same_node_s_per_token + remote * remote_s_per_token

``rate(r)`` is r's measured prefill rate (tokens per busy second, from its own counters)
over its slowdown (how much longer than predicted this router's prefills there took) and
over how late its oldest prefill in flight runs now (``InFlight.late``: the slowdown learns
of a stall only once a prefill answers). ``queued(r)`` is the work this router has in flight
there, in token-equivalents (the tokens each request computes plus its blocking store loads
at r's rate). The replica's own report of queued tokens is a stats period old and counts
whole prompts: it is used only when several routers share the pool (``shared_routers``), to
see the others' work. The transfer costs come from the store's measured get latencies.
Replicas within ``tie_s`` (or ``tie_rel``) of the best are ties. Among ties the ones whose
own cache holds the most of the prompt stay: the score prices this request only, and a
conversation kept where its cache is pays again on every later turn, which the replicas
that would load it cannot offer (the simulator at 512 replicas: 87.8% to 94.9% of requests
within the SLO). Of what is left, two are drawn at random and the one with fewer requests
in flight wins (power of two choices), so equal replicas share the load.

A pool of more than 16 replicas is not scored whole: the replicas whose own cache holds a
prefix of the prompt are (the eight deepest, when more hold one: a hot system prompt is in
nearly every cache), and of the rest (whose scores differ only by load, rate and their
node's store) a sample: two replicas of each of the two nodes whose store holds the
deepest prefix and about four drawn from the whole pool (``router.policy.sampling``). A decision's
explanation names the sampled candidates. Scoring every replica was the largest per-request
cost after the index walks, and grew with the pool (bench.router); in the simulator the
sample routes at least as well as scoring every replica did (README, "Routing policies").

Decode, for replica r: requests in flight and KV usage decide; a replica off the node
whose store holds the prompt's KV (usually the prefill replica's node) pays
``locality * (1 + its load)`` times the share of the prompt's chunks its own node does not
hold (hot chunks replicated there, ``kvstore/replication.py``): it pulls that share over the
network while its batch waits.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import attrgetter

from kvstore.messages import ReplicaLoad
from router.policy.interface import (
    Candidate,
    RouteDecision,
    RoutingPolicy,
    RoutingRequest,
    ScoreTable,
    best_then_rest,
)
from router.policy.sampling import ColdSampler
from router.policy.simple import LeastLoadedPolicy, load_score
from router.policy.state import RoutingState

# Prefill candidates carry the inputs of their score (the score is the estimated TTFT, s).
PREFILL_TERMS = ("queued_tokens", "rate_tps", "own_tokens", "node_tokens", "remote_tokens")
DECODE_TERMS = ("load", "remote_kv")
_replica_name = attrgetter("replica")


class KVAwarePolicy(RoutingPolicy):
    name = "kv_aware"

    def __init__(self, state: RoutingState, role: str = "", rng: random.Random | None = None,
                 tie_s: float = 0.005, tie_rel: float = 0.05, locality: float = 1.0) -> None:
        self.state, self.role = state, role
        self.tie_s, self.tie_rel, self.locality = tie_s, tie_rel, locality
        self._rng = rng or random.Random()
        self._fallback = LeastLoadedPolicy(role, self._rng)
        self._pool_names: list[str] = []
        self._by_name: dict[str, int] = {}
        self._by_node: dict[str, list[int]] = {}
        self._nodes: list[str] = []
        self._sampler = ColdSampler(self._rng)

    def route(self, request: RoutingRequest | None, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        if request is None or not replicas:
            d = self._fallback.route(request, replicas)
            return RouteDecision(self.name, d.role, d.groups, "no hint: load", d.candidates, d.term_names)
        if request.role == "decode":
            return self._decode(request, replicas)
        return self._prefill(request, replicas)

    # -- prefill ---------------------------------------------------------------------------

    def _prefill(self, request: RoutingRequest, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        """Runs for every request: every replica of a small pool is scored, the deepest warm
        ones and a sample of the rest in a large one (``ColdSampler``), the warm ones first."""
        st, ct, n, keys = self.state, self.state.chunk_tokens, request.num_prompt_tokens, request.chunk_keys
        own_depth, node_depth, stored = st.prefix_view(keys)
        # min() and max() are written out on this path: a builtin call costs several times
        # the comparison (cachegrind: about 17k of 255k instructions a decision in _warm).
        limit = n - 1 if n > 1 else 0  # an engine computes at least the prompt's last token
        anywhere = stored * ct if stored * ct < limit else limit
        names, by_name, by_node, nodes = self._pool(replicas)
        sampler = self._sampler
        drawn = sampler.samples(len(names))
        kept = sampler.warm(own_depth, by_name) if drawn else own_depth.items()
        warm = self._warm(kept, node_depth, by_name, nodes, limit, anywhere)
        w = len(warm)
        if drawn:
            picks = sampler.positions(warm, len(names), node_depth, by_node)
        else:
            picks = [*warm, *(i for i in range(len(names)) if i not in warm)]
        picked = list(map(names.__getitem__, picks))  # C loops on this path, as below
        queued = list(map(st.queued_by_replica().get, picked, repeat(0)))
        if st.shared_routers:  # other routers' work, seen a stats period late
            queued = [max(q, replicas[i].queued_tokens) for q, i in zip(queued, picks, strict=True)]
        rates = list(map(st.rates.table().get, picked, repeat(st.rates.prior_tps)))
        late = st.late(picked)  # a replica behind its predictions right now (None: none is)
        if late is not None:
            rates = [rate / f for rate, f in zip(rates, late, strict=True)]
        # A cold replica computes what no store holds and loads the rest, its node's share
        # from there: load_s(node, anywhere - node) = load_s(0, anywhere) - node * saved.
        costs = st.costs
        work, load = n - anywhere, costs.load_s(0, anywhere)
        if node_depth:
            saved = costs.remote_s_per_token - costs.same_node_s_per_token
            save_s = {nd: (depth * ct if depth * ct < limit else limit) * saved
                      for nd, depth in node_depth.items()}
            scores = [(q + work) / rate + load - save_s.get(nodes[i], 0.0)
                      for q, rate, i in zip(queued, rates, picks, strict=True)]
        else:
            scores = [(q + work) / rate + load for q, rate in zip(queued, rates, strict=True)]
        same, far = costs.same_node_s_per_token, costs.remote_s_per_token  # load_s, inlined
        for j, (own, node, remote) in enumerate(warm.values()):
            scores[j] = (queued[j] + n - own - node - remote) / rates[j] + node * same + remote * far

        def row(j: int) -> tuple[float, ...]:  # the terms, read only by explanations
            if j < w:
                return queued[j], rates[j], *warm[picks[j]]
            node = min(node_depth.get(nodes[picks[j]], 0) * ct, limit)
            return queued[j], rates[j], 0, node, anywhere - node

        at, why = self._choose(scores, replicas, picks, self.tie_s, [t[0] for t in warm.values()])
        p = picks[at]
        # The chosen one's work (RoutingState.routed): the tokens it computes, plus its store
        # loads at its rate (they block the engine step). Priced here, where the terms are.
        own_t, node_t, remote_t = row(at)[2:]
        rate = st.rates.table().get(picked[at], st.rates.prior_tps)  # queued work is counted at this rate
        chosen_work = int(n - own_t - node_t - remote_t + (node_t * same + remote_t * far) * rate)
        return RouteDecision(self.name, request.role, best_then_rest(names[p], names, p), why,
                             ScoreTable(picked, scores, row), PREFILL_TERMS, picked[w:] if drawn else (),
                             chosen_work)

    def _warm(self, own_depth: Iterable[tuple[str, int]], node_depth: dict[str, int], by_name: dict[str, int],
              nodes: list[str], limit: int, anywhere: int) -> dict[int, tuple[int, int, int]]:
        """Own, node and remote tokens of each replica of the pool whose own cache holds a
        prefix of the prompt (of those the sampler kept, in a large pool), by pool position."""
        ct = self.state.chunk_tokens
        warm: dict[int, tuple[int, int, int]] = {}
        for name, depth in own_depth:
            i = by_name.get(name, -1)
            if i >= 0:
                own = depth * ct if depth * ct < limit else limit
                node = node_depth.get(nodes[i], 0) * ct - own
                node = 0 if node < 0 else node if node < limit - own else limit - own
                remote = anywhere - own - node
                warm[i] = (own, node, remote if remote > 0 else 0)
        return warm

    def _pool(
        self, replicas: Sequence[ReplicaLoad],
    ) -> tuple[list[str], dict[str, int], dict[str, list[int]], list[str]]:
        """Names, name -> position, node -> positions, node per position; rebuilt only when
        the pool changes."""
        names = list(map(_replica_name, replicas))
        if names != self._pool_names:
            self._pool_names = names
            self._by_name = {name: i for i, name in enumerate(names)}
            self._nodes = [r.node_id for r in replicas]
            self._by_node = {}
            for i, node in enumerate(self._nodes):
                self._by_node.setdefault(node, []).append(i)
        return self._pool_names, self._by_name, self._by_node, self._nodes

    # -- decode ----------------------------------------------------------------------------

    def _decode(self, request: RoutingRequest, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        kv_node, keys = request.prefer_node, request.chunk_keys
        held = self.state.store.prefix_by_node(keys) if keys else {}
        if not kv_node:
            kv_node = max(held, key=lambda node: held[node], default="")
        cands: list[Candidate] = []
        for r in replicas:
            load = load_score(r) + 3.0 * r.kv_usage  # a nearly full KV cache soon preempts
            # Off the KV's node the prompt's KV is pulled over the network, stalling every
            # sequence the replica is running: the penalty grows with its batch, and shrinks
            # with the share of the prompt's chunks the replica's own node holds already
            # (replicas of hot chunks, kvstore/replication.py), which load from shared memory.
            far = 0.0
            if kv_node and r.node_id != kv_node:
                far = self.locality * (1.0 + load) * (1.0 - held.get(r.node_id, 0) / len(keys) if keys else 1.0)
            cands.append((r.replica, load + far, (load, far)))
        names = [c[0] for c in cands]
        at, why = self._choose([c[1] for c in cands], replicas, range(len(replicas)), 0.5)
        return RouteDecision(self.name, request.role, best_then_rest(names[at], names, at), why, cands, DECODE_TERMS)

    # -- shared ------------------------------------------------------------------------------

    def _choose(self, scores: Sequence[float], replicas: Sequence[ReplicaLoad], at_pool: Sequence[int],
                tie_abs: float, own: Sequence[int] = ()) -> tuple[int, str]:
        """The lowest score wins; candidates within the tie margin of it are ties, settled by
        power of two choices on load (random among exact equals). Returns the winner's index
        in ``scores`` and the rule; ``at_pool[i]`` is candidate i's position in ``replicas``,
        ``own`` the own-cache tokens of the first (warm) candidates."""
        best = min(scores)
        rel = abs(best) * self.tie_rel
        margin = best + (rel if rel > tie_abs else tie_abs)
        # Among equals, those whose own cache holds the most (docstring). The warm replicas
        # are few: look among them first and scan every score only when none ties.
        warm_ties = [i for i, tokens in enumerate(own) if tokens > 0 and scores[i] <= margin]
        if warm_ties:
            most = max(own[i] for i in warm_ties)
            ties = [i for i in warm_ties if own[i] == most]
        else:
            ties = [i for i, score in enumerate(scores) if score <= margin]
        if len(ties) == 1:
            return ties[0], "lowest score"
        k = len(ties)
        rand = self._rng.random  # int(rand() * k): randrange's draw at a third of its cost
        x = int(rand() * k)
        y = int(rand() * (k - 1))
        a, b = ties[x], ties[y + (y >= x)]  # two distinct ties, drawn at random
        la, lb = load_score(replicas[at_pool[a]]), load_score(replicas[at_pool[b]])  # exact in-flight counts
        at = a if (la, scores[a]) <= (lb, scores[b]) else b
        return at, f"tie of {k}: power of two choices"
