"""Slot allocator for one shared-memory segment.

The Store Agent owns the segment and is the only process that hands out or frees slots;
engines only write into / read from the slots they were given. Allocation is first-fit over
a free list kept sorted by offset, with neighbours coalesced on free, so a segment that holds
chunks of one size (the common case) never fragments, and mixed sizes degrade gracefully.

    offset 0                                                     capacity
    | used  |  free  | used | used |        free                    |
              ^ free list: [(off, len), ...] sorted by off

Every slot is aligned to ``ALIGN`` bytes so tensor views over the segment are aligned too.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

ALIGN = 64


class OutOfSpace(Exception):
    """No free run is large enough for the request (after eviction, the caller's choice)."""


@dataclass(frozen=True)
class Slot:
    offset: int
    length: int


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class SlotAllocator:
    def __init__(self, capacity: int) -> None:
        if capacity < ALIGN:
            raise ValueError(f"capacity must be at least {ALIGN} bytes, got {capacity}")
        self.capacity = capacity - capacity % ALIGN
        self._free_offsets: list[int] = [0]
        self._free_lengths: list[int] = [self.capacity]
        self._used: dict[int, int] = {}  # offset -> aligned length

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    def allocate(self, length: int) -> Slot:
        if length <= 0:
            raise ValueError(f"slot length must be positive, got {length}")
        need = _aligned(length)
        for i, run in enumerate(self._free_lengths):
            if run >= need:
                offset = self._free_offsets[i]
                if run == need:
                    del self._free_offsets[i]
                    del self._free_lengths[i]
                else:
                    self._free_offsets[i] += need
                    self._free_lengths[i] -= need
                self._used[offset] = need
                return Slot(offset, length)
        raise OutOfSpace(f"no free run of {need} bytes ({self.free_bytes} free, fragmented)")

    def free(self, offset: int) -> None:
        length = self._used.pop(offset, None)
        if length is None:
            raise KeyError(f"offset {offset} is not an allocated slot")
        i = bisect.bisect_left(self._free_offsets, offset)
        self._free_offsets.insert(i, offset)
        self._free_lengths.insert(i, length)
        # Coalesce with the right neighbour, then with the left one.
        if i + 1 < len(self._free_offsets) and offset + length == self._free_offsets[i + 1]:
            self._free_lengths[i] += self._free_lengths.pop(i + 1)
            self._free_offsets.pop(i + 1)
        if i > 0 and self._free_offsets[i - 1] + self._free_lengths[i - 1] == offset:
            self._free_lengths[i - 1] += self._free_lengths.pop(i)
            self._free_offsets.pop(i)

    def is_allocated(self, offset: int) -> bool:
        return offset in self._used
