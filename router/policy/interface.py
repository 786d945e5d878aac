"""The routing contract: which replica of a pool gets a request, and why.

``RoutingPolicy.route`` is called by the Serve request router (``router.replica_router``) in
the router replica's own process, once per routing attempt, on the event loop: it must not
block or do I/O (everything it reads is in memory: the replicas' last load reports and the
``RoutingState`` that feed threads keep current). The simulator (``bench/sim``) calls the
same objects with simulated replicas.

A decision is typed and explainable: the replicas in groups, best group first (Serve tries
a group's replicas before the next group's), and every candidate's score with the terms it
was made of.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, overload

import msgpack

from kvstore.messages import ReplicaLoad


@dataclass(frozen=True)
class RoutingRequest:
    """What the ingress tells the request router about one call (a handle-call kwarg)."""

    request_id: str
    role: str  # "prefill" | "decode"
    num_prompt_tokens: int
    chunk_keys: tuple[bytes, ...]
    prefer_node: str = ""  # decode: the node of the prefill replica that saved the KV

    def encode(self) -> bytes:
        raw: bytes = msgpack.packb([self.request_id, self.role, self.num_prompt_tokens, list(self.chunk_keys),
                                    self.prefer_node])
        return raw

    @classmethod
    def decode(cls, raw: bytes) -> RoutingRequest:
        rid, role, n, keys, node = msgpack.unpackb(raw)
        return cls(rid, role, n, tuple(keys), node)


@dataclass(frozen=True)
class ScoredReplica:
    replica: str
    score: float  # lower is better, in the policy's unit (kv_aware: estimated seconds)
    terms: dict[str, float] = field(default_factory=dict)  # what the score was made of


# One candidate as a policy computes it on the hot path: (replica, score, term values), the
# values in the order of the decision's ``term_names``. Objects and sorting wait until someone
# asks for the explanation (``RouteDecision.scored``), so a decision stays in microseconds.
Candidate = tuple[str, float, tuple[float, ...]]


class ScoreTable(Sequence[Candidate]):
    """Candidates held as columns (names, scores, and a function that builds row i's term
    values), made into ``Candidate`` tuples only when read: a policy that scores hundreds of
    replicas per request skips building hundreds of tuples that only an explanation reads."""

    def __init__(self, names: list[str], scores: list[float], row: Callable[[int], tuple[float, ...]]) -> None:
        self.names, self.scores, self._row = names, scores, row

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, i: int) -> Candidate: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Candidate]: ...

    def __getitem__(self, i: int | slice) -> Candidate | Sequence[Candidate]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.names[i], self.scores[i], self._row(i)

    def terms_at(self, replica: str) -> tuple[float, ...]:
        return self._row(self.names.index(replica))


class RouteDecision(NamedTuple):
    """One decision. A NamedTuple, immutable as a frozen dataclass is but four times cheaper
    to build (a frozen dataclass sets each field through ``object.__setattr__``): a router
    builds one per request."""

    policy: str
    role: str
    groups: list[list[str]]  # replica names, best group first
    why: str = ""  # the rule that decided (e.g. "cache", "balance", "tie: power of two")
    candidates: Sequence[Candidate] = ()
    term_names: tuple[str, ...] = ()
    # A large pool: the candidates scored because they were drawn (the warm ones are always
    # scored, the cold ones not drawn are not); empty when every replica was scored.
    sampled: Sequence[str] = ()
    # What the request will occupy the chosen replica for, in its prompt tokens (see
    # ``RoutingState.routed``), when the policy priced it while scoring; -1: work it out.
    work_tokens: int = -1

    @property
    def chosen(self) -> str:
        return self.groups[0][0] if self.groups and self.groups[0] else ""

    def terms_of(self, replica: str) -> dict[str, float]:
        """One candidate's terms, without reading the others."""
        if isinstance(self.candidates, ScoreTable):
            return dict(zip(self.term_names, self.candidates.terms_at(replica), strict=False))
        for name, _score, terms in self.candidates:
            if name == replica:
                return dict(zip(self.term_names, terms, strict=False))
        return {}

    def top(self, k: int) -> list[ScoredReplica]:
        """The chosen candidate, then the best others, ``k`` in all, reading only those rows
        (for the response header: every request pays for it)."""
        if isinstance(self.candidates, ScoreTable):
            names, scores = self.candidates.names, self.candidates.scores
        else:
            names, scores = [c[0] for c in self.candidates], [c[1] for c in self.candidates]
        chosen = self.chosen
        rest = heapq.nsmallest(k, (i for i, name in enumerate(names) if name != chosen), key=scores.__getitem__)
        picked = ([names.index(chosen)] if chosen in names else []) + rest
        return [ScoredReplica(names[i], scores[i], dict(zip(self.term_names, self.candidates[i][2], strict=False)))
                for i in picked[:k]]

    @property
    def scored(self) -> tuple[ScoredReplica, ...]:
        """Every candidate, the chosen one first, then by score."""
        chosen = self.chosen
        ordered = sorted(self.candidates, key=lambda c: (c[0] != chosen, c[1]))
        return tuple(ScoredReplica(name, score, dict(zip(self.term_names, terms, strict=True)))
                     for name, score, terms in ordered)

    def explain(self) -> dict[str, Any]:
        """JSON-ready: the debug endpoint's and the log line's form. A decision that scored a
        sample says so: each candidate's ``sampled``, and how many replicas the pool had."""
        out: dict[str, Any] = {
            "policy": self.policy, "role": self.role, "chosen": self.chosen, "why": self.why,
            "candidates": [{"replica": s.replica, "score": round(s.score, 6),
                            **{k: round(v, 6) for k, v in s.terms.items()}} for s in self.scored],
        }
        if self.sampled:
            drawn = set(self.sampled)
            for c in out["candidates"]:
                c["sampled"] = c["replica"] in drawn
            out["pool"] = sum(map(len, self.groups))
        return out


def best_then_rest(best: str, names: Sequence[str], at: int = -1) -> list[list[str]]:
    """The chosen replica alone, then every other as a fallback (Serve picks among a group's
    replicas itself, so the fallbacks need no order). ``at``: the chosen one's position in
    ``names``, when the caller knows it (two C-level slices instead of a scan)."""
    if at >= 0 and isinstance(names, list):
        rest = names[:at] + names[at + 1 :]
    else:
        rest = [n for n in names if n != best]
    return [[best], rest] if rest else [[best]]


class RoutingPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def route(self, request: RoutingRequest | None, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        """Rank ``replicas`` for ``request`` (None for calls without a hint: health checks,
        admin calls). Pure in-memory work, well under a millisecond."""

    def rank(self, request: RoutingRequest | None, replicas: Sequence[ReplicaLoad]) -> list[list[str]]:
        return self.route(request, replicas).groups
