"""``kv_aware`` (the default): each replica scored by when this request would get its first
token there, with every cache in the cluster counted at what it is worth.

Prefill, for replica r and a prompt of n tokens (chunk keys k1..km):

    own     = leading tokens in r's own engine cache                    (free)
    node    = next leading tokens in the store on r's node              (shared-memory load)
    remote  = next leading tokens in the store on other nodes           (network pull)
    compute = n - own - node - remote                                   (at least 1 token)

    ttft(r) = queued(r) / rate(r) + compute / rate(r)
              + node * same_node_s_per_token + remote * remote_s_per_token

``rate(r)`` is r's measured prefill rate (tokens per busy second, from its own counters),
``queued(r)`` the work this router has in flight there, in token-equivalents (the tokens
each request computes plus its blocking store loads at r's rate). The replica's own report
of queued tokens is a stats period old and counts whole prompts: it is used only when
several routers share the pool (``shared_routers``), to see the others' work. The transfer
costs come from the store's measured get latencies. Replicas within ``tie_s`` (or
``tie_rel``) of the best are ties. Among ties the ones whose own cache holds the most of the
prompt stay: the score prices this request only, and a conversation kept where its cache is
pays again on every later turn, which the replicas that would load it cannot offer (the
simulator at 512 replicas: 87.8% to 94.9% of requests within the SLO). Of what is left, two
are drawn at random and the one with fewer requests in flight wins (power of two choices),
so equal replicas share the load.

Decode, for replica r: requests in flight and KV usage decide; a replica off the node
whose store holds the prompt's KV (usually the prefill replica's node) pays
``locality * (1 + its load)``: it pulls the KV over the network while its batch waits.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import repeat

from kvstore.messages import ReplicaLoad
from router.policy.interface import (
    Candidate,
    RouteDecision,
    RoutingPolicy,
    RoutingRequest,
    ScoreTable,
    best_then_rest,
)
from router.policy.simple import LeastLoadedPolicy, load_score
from router.policy.state import RoutingState

# Prefill candidates carry the inputs of their score (the score is the estimated TTFT, s).
PREFILL_TERMS = ("queued_tokens", "rate_tps", "own_tokens", "node_tokens", "remote_tokens")
DECODE_TERMS = ("load", "remote_kv")


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
        self._rate_list: list[float] = []
        self._rates_at = -1  # the rate meter's version the cached rate list is from

    def route(self, request: RoutingRequest | None, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        if request is None or not replicas:
            d = self._fallback.route(request, replicas)
            return RouteDecision(self.name, d.role, d.groups, "no hint: load", d.candidates, d.term_names)
        if request.role == "decode":
            return self._decode(request, replicas)
        return self._prefill(request, replicas)

    # -- prefill ---------------------------------------------------------------------------

    def _prefill(self, request: RoutingRequest, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        """Runs for every request, over every replica: the common case (a replica that holds
        nothing of the prompt on its node or in its own cache) is scored in one whole-column
        pass, the few warm replicas one by one after. Per-pool lists (names, nodes, rates) are
        rebuilt only when the pool or a measured rate changes."""
        st, ct, n, keys = self.state, self.state.chunk_tokens, request.num_prompt_tokens, request.chunk_keys
        own_depth = st.engines.prefix_by_replica(keys) if keys else {}
        node_depth, stored = st.store.prefix_by_node_and_any(keys) if keys else ({}, 0)
        limit = max(n - 1, 0)  # an engine computes at least the prompt's last token
        anywhere = min(stored * ct, limit)
        load_s = st.costs.load_s
        names, by_name, by_node, nodes = self._pool(replicas)
        rates = self._rates(names)
        queued = list(map(st.queued_by_replica().get, names, repeat(0, len(names))))
        if st.shared_routers:  # other routers' work, seen a stats period late
            queued = list(map(max, queued, [r.queued_tokens for r in replicas]))
        cold_tokens, cold_load_s = n - anywhere, load_s(0, anywhere)
        scores = [(q + cold_tokens) / rate + cold_load_s for q, rate in zip(queued, rates, strict=True)]
        # Replicas on a node whose store holds a prefix of the prompt: one term set per node.
        on_node: dict[str, tuple[int, int, int]] = {}
        for nd, depth in node_depth.items():
            members = by_node.get(nd)
            node_t = min(depth * ct, limit)
            remote_t = max(anywhere - node_t, 0)
            on_node[nd] = (0, node_t, remote_t)
            if members:
                work, node_load_s = n - node_t - remote_t, load_s(node_t, remote_t)
                for i in members:
                    scores[i] = (queued[i] + work) / rates[i] + node_load_s
        # Replicas whose own cache holds a prefix: each on its own.
        own_terms: dict[int, tuple[int, int, int]] = {}
        for name, depth in own_depth.items():
            i = by_name.get(name, -1)
            if i < 0:
                continue
            own = min(depth * ct, limit)
            node = min(max(node_depth.get(nodes[i], 0) * ct - own, 0), limit - own)
            remote = max(anywhere - own - node, 0)
            own_terms[i] = (own, node, remote)
            scores[i] = (queued[i] + n - own - node - remote) / rates[i] + load_s(node, remote)
        cold = (0, 0, anywhere)

        def row(i: int) -> tuple[float, ...]:
            terms = own_terms.get(i) or on_node.get(nodes[i], cold)
            return (queued[i], rates[i], *terms)

        table = ScoreTable(names, scores, row)
        warm = {i: t[0] for i, t in own_terms.items()}
        return self._decide(request.role, table, replicas, PREFILL_TERMS, self.tie_s, warm)

    def _pool(
        self, replicas: Sequence[ReplicaLoad],
    ) -> tuple[list[str], dict[str, int], dict[str, list[int]], list[str]]:
        """Names, name -> position, node -> positions, node per position; rebuilt only when
        the pool changes."""
        names = [r.replica for r in replicas]
        if names != self._pool_names:
            self._pool_names = names
            self._by_name = {name: i for i, name in enumerate(names)}
            self._nodes = [r.node_id for r in replicas]
            self._by_node = {}
            for i, node in enumerate(self._nodes):
                self._by_node.setdefault(node, []).append(i)
            self._rates_at = -1
        return self._pool_names, self._by_name, self._by_node, self._nodes

    def _rates(self, names: list[str]) -> list[float]:
        """Each replica's measured prefill rate, in pool order (the prior where unmeasured)."""
        meter = self.state.rates
        if self._rates_at != meter.version:
            self._rate_list = list(map(meter.table().get, names, repeat(meter.prior_tps, len(names))))
            self._rates_at = meter.version
        return self._rate_list

    # -- decode ----------------------------------------------------------------------------

    def _decode(self, request: RoutingRequest, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        kv_node = request.prefer_node
        if not kv_node and request.chunk_keys:
            by_node = self.state.store.prefix_by_node(request.chunk_keys)
            kv_node = max(by_node, key=lambda node: by_node[node], default="")
        cands: list[Candidate] = []
        for r in replicas:
            load = load_score(r) + 3.0 * r.kv_usage  # a nearly full KV cache soon preempts
            # Off the KV's node the prompt's KV is pulled over the network, stalling every
            # sequence the replica is running: the penalty grows with its batch.
            far = self.locality * (1.0 + load) if kv_node and r.node_id != kv_node else 0.0
            cands.append((r.replica, load + far, (load, far)))
        return self._decide(request.role, cands, replicas, DECODE_TERMS, 0.5)

    # -- shared ------------------------------------------------------------------------------

    def _decide(self, role: str, cands: Sequence[Candidate], replicas: Sequence[ReplicaLoad],
                terms: tuple[str, ...], tie_abs: float, warm: dict[int, int] | None = None) -> RouteDecision:
        """The lowest score wins; candidates within the tie margin of it are ties, settled by
        power of two choices on load (random among exact equals)."""
        if isinstance(cands, ScoreTable):
            names, scores = cands.names, cands.scores
        else:
            names, scores = [c[0] for c in cands], [c[1] for c in cands]
        best = min(scores)
        margin = best + max(tie_abs, abs(best) * self.tie_rel)
        # Among equals, those whose own cache holds the most (docstring). The warm replicas
        # are few: look among them first and scan every score only when none ties.
        warm_ties = [i for i, own in warm.items() if own > 0 and scores[i] <= margin] if warm else []
        if warm_ties:
            most = max(warm[i] for i in warm_ties)
            ties = sorted(i for i in warm_ties if warm[i] == most)  # in pool order, as the scan gives
        else:
            ties = [i for i, score in enumerate(scores) if score <= margin]
        if len(ties) == 1:
            at, why = ties[0], "lowest score"
        else:
            k = len(ties)
            x = self._rng.randrange(k)
            y = self._rng.randrange(k - 1)
            a, b = ties[x], ties[y + (y >= x)]  # two distinct ties, drawn at random
            la, lb = load_score(replicas[a]), load_score(replicas[b])  # exact in-flight counts
            at = a if (la, scores[a]) <= (lb, scores[b]) else b
            why = f"tie of {k}: power of two choices"
        return RouteDecision(self.name, role, best_then_rest(names[at], names, at), why, cands, terms)
