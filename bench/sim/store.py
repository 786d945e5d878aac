"""The simulated Mooncake-like store: one LRU segment per node, one location per chunk.

Like the real store (``kvstore.metadata``), a chunk key has ONE committed location, the node
that saved it first; an engine saves only the chunks beyond the store's hit for its prompt
(``kvstore.connector_plan.StepPlanner.save_items``), so a chunk loaded from another node is
not copied to the reader's node. Lookups walk the prompt's keys from the first and stop at
the first miss (``MetadataStore.prefix_hits``).

Every store and eviction is reported through ``on_change(op, node, keys)``, the way the
store's change stream reaches the router's ``StoreIndex``; loads are counted in the same
counters the engines flush to Redis (``loaded_*_chunks``, ``get_seconds:<transport>_sum_us``),
which the router turns into ``TransferCosts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.sim.lru import ChunkLRU
from bench.sim.profiles import CostModel

ChangeFn = Callable[[str, str, list[bytes]], None]  # (op: "stored" | "removed", node, keys)


@dataclass(frozen=True)
class StoreHit:
    chunks: int  # leading chunks of the prompt held somewhere in the store
    same_node_chunks: int  # of those past the reader's own cache: on the reader's node
    remote_chunks: int  # ... on other nodes


class KVStore:
    def __init__(self, cost: CostModel, nodes: Sequence[str], on_change: ChangeFn) -> None:
        self.cost = cost
        self._segments = {node: ChunkLRU(cost.store_chunks_per_node) for node in nodes}
        self._where: dict[bytes, str] = {}
        self._on_change = on_change
        self.stats: dict[str, int] = {"loaded_local_chunks": 0, "loaded_remote_chunks": 0,
                                      "get_seconds:shm_sum_us": 0, "get_seconds:tcp_sum_us": 0,
                                      "saved_chunks": 0, "evicted": 0}

    def chunks_on(self, node: str) -> int:
        return len(self._segments[node])

    def node_of(self, key: bytes) -> str | None:
        return self._where.get(key)

    def fetch(self, reader: str, keys: Sequence[bytes], first: int, limit: int) -> StoreHit:
        """Look up the leading chunks of ``keys`` (at most ``limit``) and load those past
        ``first`` (what the reader's own cache already holds) into ``reader``'s node."""
        where = self._where
        hit = 0
        for key in keys[:limit]:
            if key not in where:
                break
            hit += 1
        same = remote = 0
        for key in keys[first:hit]:
            node = where[key]
            self._segments[node].touch((key,))
            if node == reader:
                same += 1
            else:
                remote += 1
        if same or remote:
            ct, s = self.cost.chunk_tokens, self.stats
            s["loaded_local_chunks"] += same
            s["loaded_remote_chunks"] += remote
            s["get_seconds:shm_sum_us"] += round(same * ct * self.cost.same_node_token_s * 1e6)
            s["get_seconds:tcp_sum_us"] += round(remote * ct * self.cost.remote_token_s * 1e6)
        return StoreHit(hit, same, remote)

    def save(self, node: str, keys: Sequence[bytes]) -> int:
        """Store on ``node`` the chunks of ``keys`` the store does not hold anywhere yet;
        returns how many were stored."""
        fresh = [k for k in keys if k not in self._where]
        if not fresh:
            return 0
        added, evicted = self._segments[node].insert(fresh)
        where = self._where
        for key in added:
            where[key] = node
        self._on_change("stored", node, added)
        if evicted:
            for key in evicted:
                del where[key]
            self._on_change("removed", node, evicted)
        self.stats["saved_chunks"] += len(added)
        self.stats["evicted"] += len(evicted)
        return len(added)
