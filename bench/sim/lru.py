"""An LRU set of chunk keys with a capacity in chunks: an engine's own prefix cache, or one
node's store segment.

Both caches are asked the same question as the real ones: how many LEADING chunks of a
prompt are held (a prefix cache is useless past its first miss, and vLLM and the store
connector both stop there).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class ChunkLRU:
    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity} chunks")
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def prefix(self, keys: Sequence[bytes]) -> int:
        """Leading chunks of ``keys`` held; the ones found become most recently used."""
        held, move = self._keys, self._keys.move_to_end
        n = 0
        for key in keys:
            if key not in held:
                break
            move(key)
            n += 1
        return n

    def touch(self, keys: Iterable[bytes]) -> None:
        held, move = self._keys, self._keys.move_to_end
        for key in keys:
            if key in held:
                move(key)

    def insert(self, keys: Iterable[bytes]) -> tuple[list[bytes], list[bytes]]:
        """Add (or refresh) ``keys``; returns (newly added, evicted to make room)."""
        held, move = self._keys, self._keys.move_to_end
        added: list[bytes] = []
        for key in keys:
            if key in held:
                move(key)
            else:
                held[key] = None
                added.append(key)
        evicted: list[bytes] = []
        while len(held) > self.capacity:
            evicted.append(held.popitem(last=False)[0])
        return added, evicted

    def discard(self, key: bytes) -> None:
        self._keys.pop(key, None)
