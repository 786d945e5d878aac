"""Which store nodes hold which chunks, as the router sees it.

Built from the store's change stream (``{prefix}:events``: stored / removed, per node), so a
routing decision reads local memory and never waits on Redis. Exact, keyed by the same chunk
keys as the store and the engines; bounded: past ``max_chunks`` the least recently touched
entries are forgotten (a forgotten chunk only costs a missed preference, never a wrong
answer: the engines look the chunk up themselves).

Events are idempotent: a repeated ``stored`` or a ``removed`` of a chunk the index never saw
change nothing, so a resync (rebuild from the node sets in Redis, then replay the stream from
the id taken before the scan) can overlap the stream safely.

The chunk -> nodes structure is ``OwnerIndex`` (one bitmask per chunk, LRU-bounded), the
store nodes as owners of kind ``STORE_NODE``; the router shares one table with the engine
cache index (``RoutingState``), so one walk answers both. One lock guards it: the feed
threads write, the event loop reads; no holder of the lock does I/O, so a query waits at
most for one batch of events.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvstore.metadata import MetadataStore, StoreEvent
from router.index.owners import STORE_NODE, OwnerIndex


def _id_tuple(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def stream_id_after(a: str, b: str) -> bool:
    """Whether stream id ``a`` comes after ``b``."""
    return _id_tuple(a) > _id_tuple(b)


@dataclass
class IndexStats:
    chunks: int
    nodes: int
    last_id: str
    applied: int
    forgotten: int
    resyncs: int


class StoreIndex:
    """``owners`` and ``lock``: a table shared with other kinds of owner (``RoutingState``)
    and the lock that guards it; by default a table of its own."""

    def __init__(self, max_chunks: int = 1_000_000, owners: OwnerIndex | None = None,
                 lock: threading.Lock | None = None) -> None:
        if (owners is None) != (lock is None):
            raise ValueError("a shared owner table comes with the lock that guards it")
        self._owners = owners if owners is not None else OwnerIndex(max_chunks, kinds=2)
        self.last_id = "0-0"  # the last stream event applied
        self._applied = self._resyncs = 0
        self._lock = lock or threading.Lock()

    # -- updates --------------------------------------------------------------------------

    def apply(self, events: Iterable[StoreEvent]) -> None:
        with self._lock:
            for event in events:
                if event.op == "stored":
                    self._owners.add(event.node_id, event.keys, STORE_NODE)
                elif event.op == "removed":
                    self._owners.remove(event.node_id, event.keys, STORE_NODE)
                if stream_id_after(event.id, self.last_id):
                    self.last_id = event.id
                self._applied += 1

    def stored(self, node_id: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._owners.add(node_id, keys, STORE_NODE)

    def removed(self, node_id: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._owners.remove(node_id, keys, STORE_NODE)

    def drop_node(self, node_id: str) -> None:
        """Forget a node (it left the cluster) and free its slot for a new one."""
        with self._lock:
            self._owners.drop_owner(node_id, STORE_NODE)

    def resync(self, meta: MetadataStore) -> None:
        """Rebuild from Redis: note where the stream ends, scan every live node's set, then
        let the feed replay the stream from that point (events in between apply twice,
        harmlessly)."""
        bounds = meta.stream_bounds()
        agents = meta.agents()
        chunks: dict[str, list[bytes]] = {a.node_id: meta.node_chunk_keys(a.node_id) for a in agents}
        with self._lock:  # the I/O is done: swap the contents in one go
            self._owners.clear(STORE_NODE)  # the engines' caches, sharing the table, stay
            for node_id, keys in chunks.items():
                self._owners.add(node_id, keys, STORE_NODE)
            self.last_id = bounds[1] if bounds else "0-0"
            self._resyncs += 1

    # -- queries (the request path: memory only) -----------------------------------------

    def holders(self, key: bytes) -> list[str]:
        with self._lock:
            return self._owners.holders(key, STORE_NODE)

    def prefix_by_node(self, keys: Sequence[bytes]) -> dict[str, int]:
        """For each node, how many leading chunks of ``keys`` it holds (contiguously)."""
        with self._lock:
            return self._owners.prefix_depths(keys, STORE_NODE)

    def prefix_by_node_and_any(self, keys: Sequence[bytes]) -> tuple[dict[str, int], int]:
        """``prefix_by_node`` and ``stored_prefix`` in one walk."""
        with self._lock:
            return self._owners.prefix_depths_and_any(keys, STORE_NODE)

    def stored_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading chunks of ``keys`` are held on some node (any mix of nodes)."""
        with self._lock:
            return self._owners.any_prefix(keys, STORE_NODE)

    def __len__(self) -> int:
        return self._owners.count(STORE_NODE)

    def stats(self) -> IndexStats:
        with self._lock:
            o = self._owners
            return IndexStats(o.count(STORE_NODE), o.owners(STORE_NODE), self.last_id, self._applied, o.forgotten,
                              self._resyncs)
