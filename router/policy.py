"""The routing contract: which replica of a pool gets a request.

``RoutingPolicy.rank`` is called by the Serve request router (``router.replica_router``)
in the router replica's own process, once per routing attempt, on the event loop: it must
not block or do I/O. It sees the prompt's chunk keys (the same keys the engines store KV
under) and every candidate replica's last reported load, and returns the replicas in
groups, best group first; Serve tries a group's replicas before the next group's.

This slice ships least-loaded; the KV-aware policy of the routing issue plugs in here.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from kvstore.messages import ReplicaLoad


@dataclass(frozen=True)
class RoutingRequest:
    request_id: str
    role: str  # "prefill" | "decode"
    num_prompt_tokens: int
    chunk_keys: tuple[bytes, ...]

    def encode(self) -> bytes:
        return msgpack.packb([self.request_id, self.role, self.num_prompt_tokens, list(self.chunk_keys)])

    @classmethod
    def decode(cls, raw: bytes) -> RoutingRequest:
        rid, role, n, keys = msgpack.unpackb(raw)
        return cls(rid, role, n, tuple(keys))


class RoutingPolicy(ABC):
    @abstractmethod
    def rank(self, request: RoutingRequest | None, replicas: Sequence[ReplicaLoad]) -> list[list[str]]:
        """Replica names grouped best-first. ``request`` is None for calls without a hint
        (health checks, admin calls)."""


class LeastLoadedPolicy(RoutingPolicy):
    """Fewest queued + running requests first (queued weighs double: they have not even
    started); ties broken at random so equal replicas share the load."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    @staticmethod
    def score(load: ReplicaLoad) -> float:
        return 2.0 * load.waiting + load.running + load.inflight + load.kv_usage

    def rank(self, request: RoutingRequest | None, replicas: Sequence[ReplicaLoad]) -> list[list[str]]:
        if not replicas:
            return []
        shuffled = list(replicas)
        self._rng.shuffle(shuffled)
        ordered = sorted(shuffled, key=self.score)
        return [[ordered[0].replica], [r.replica for r in ordered[1:]]] if len(ordered) > 1 else [[ordered[0].replica]]


def make_policy(name: str) -> RoutingPolicy:
    if name == "least_loaded":
        return LeastLoadedPolicy()
    raise ValueError(f"unknown routing policy {name!r}")
