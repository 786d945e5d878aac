"""Which store nodes hold which chunks, as the router sees it.

Built from the store's change stream (``{prefix}:events``: stored / removed, per node), so a
routing decision reads local memory and never waits on Redis. Exact, keyed by the same chunk
keys as the store and the engines; bounded: past ``max_chunks`` the least recently touched
entries are forgotten (a forgotten chunk only costs a missed preference, never a wrong
answer: the engines look the chunk up themselves).

Events are idempotent: a repeated ``stored`` or a ``removed`` of a chunk the index never saw
change nothing, so a resync (rebuild from the node sets in Redis, then replay the stream from
the id taken before the scan) can overlap the stream safely.

Per chunk the index keeps one int, a bitmask over node slots (``_slot_of``), in an
OrderedDict for the LRU order. One lock guards it: the feed thread writes, the event loop
reads; no holder of the lock does I/O, so a query waits at most for one batch of events.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvstore.metadata import MetadataStore, StoreEvent


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
    def __init__(self, max_chunks: int = 1_000_000) -> None:
        self.max_chunks = max_chunks
        self._chunks: OrderedDict[bytes, int] = OrderedDict()  # key -> bitmask of node slots
        self._slot_of: dict[str, int] = {}
        self._node_at: list[str | None] = []
        self.last_id = "0-0"  # the last stream event applied
        self._applied = self._forgotten = self._resyncs = 0
        self._lock = threading.Lock()

    # -- updates --------------------------------------------------------------------------

    def apply(self, events: Iterable[StoreEvent]) -> None:
        with self._lock:
            for event in events:
                if event.op == "stored":
                    self._stored(event.node_id, event.keys)
                elif event.op == "removed":
                    self._removed(event.node_id, event.keys)
                if stream_id_after(event.id, self.last_id):
                    self.last_id = event.id
                self._applied += 1

    def stored(self, node_id: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._stored(node_id, keys)

    def removed(self, node_id: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._removed(node_id, keys)

    def _stored(self, node_id: str, keys: Iterable[bytes]) -> None:
        bit = 1 << self._slot(node_id)
        for key in keys:
            self._chunks[key] = self._chunks.get(key, 0) | bit
            self._chunks.move_to_end(key)
        while len(self._chunks) > self.max_chunks:
            self._chunks.popitem(last=False)
            self._forgotten += 1

    def _removed(self, node_id: str, keys: Iterable[bytes]) -> None:
        slot = self._slot_of.get(node_id)
        if slot is None:
            return
        bit = 1 << slot
        for key in keys:
            mask = self._chunks.get(key)
            if mask is None:
                continue
            if mask & ~bit:
                self._chunks[key] = mask & ~bit
            else:
                del self._chunks[key]

    def drop_node(self, node_id: str) -> None:
        """Forget a node (it left the cluster) and free its slot for a new one."""
        with self._lock:
            self._drop_node(node_id)

    def _drop_node(self, node_id: str) -> None:
        slot = self._slot_of.pop(node_id, None)
        if slot is None:
            return
        bit = 1 << slot
        for key in [k for k, m in self._chunks.items() if m & bit]:
            mask = self._chunks[key] & ~bit
            if mask:
                self._chunks[key] = mask
            else:
                del self._chunks[key]
        self._node_at[slot] = None

    def _slot(self, node_id: str) -> int:
        slot = self._slot_of.get(node_id)
        if slot is None:
            free = [i for i, n in enumerate(self._node_at) if n is None]
            slot = free[0] if free else len(self._node_at)
            if slot == len(self._node_at):
                self._node_at.append(node_id)
            else:
                self._node_at[slot] = node_id
            self._slot_of[node_id] = slot
        return slot

    def resync(self, meta: MetadataStore) -> None:
        """Rebuild from Redis: note where the stream ends, scan every live node's set, then
        let the feed replay the stream from that point (events in between apply twice,
        harmlessly)."""
        bounds = meta.stream_bounds()
        agents = meta.agents()
        chunks: dict[str, list[bytes]] = {a.node_id: meta.node_chunk_keys(a.node_id) for a in agents}
        with self._lock:  # the I/O is done: swap the contents in one go
            self._chunks.clear()
            self._slot_of.clear()
            self._node_at.clear()
            for node_id, keys in chunks.items():
                self._stored(node_id, keys)
            self.last_id = bounds[1] if bounds else "0-0"
            self._resyncs += 1

    # -- queries (the request path: memory only) -----------------------------------------

    def holders(self, key: bytes) -> list[str]:
        with self._lock:
            mask = self._chunks.get(key, 0)
            return [n for n, slot in self._slot_of.items() if mask >> slot & 1]

    def prefix_by_node(self, keys: Sequence[bytes]) -> dict[str, int]:
        """For each node, how many leading chunks of ``keys`` it holds (contiguously)."""
        out: dict[str, int] = {}
        with self._lock:
            alive = (1 << len(self._node_at)) - 1
            for i, key in enumerate(keys):
                alive &= self._chunks.get(key, 0)
                if not alive:
                    break
                for node, slot in self._slot_of.items():
                    if alive >> slot & 1:
                        out[node] = i + 1
        return out

    def stored_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading chunks of ``keys`` are held on some node (any mix of nodes)."""
        n = 0
        with self._lock:
            for key in keys:
                if not self._chunks.get(key):
                    break
                n += 1
            if n:
                self._chunks.move_to_end(keys[0])  # the prefix's root is in use
        return n

    def stats(self) -> IndexStats:
        with self._lock:
            return IndexStats(len(self._chunks), len(self._slot_of), self.last_id, self._applied,
                              self._forgotten, self._resyncs)
