"""Checksums taken while a remote read lands, so a slot is verified the moment it is in.

A network read fills the landing buffer front to back. Hashing each piece right after the
receive that brought it reads it from the cache of the core that just wrote it (xxh3 runs
as a stream: a checksum block split over several receives gets the digest it would get in
one go); hashing a whole multi-MiB slot afterwards, or on a helper thread (a third busy
thread on a two-core node, beside the sender and the receiver), reads it from DRAM again.
With the digests taken, verifying a slot is a header check and a fold.

This runs once per block and once per slot of every remote read: at 64 KiB chunks that is
1,024 of each per 64 MiB, so the common case (a whole block inside what landed) is one
tight loop with its state in locals.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from kvstore.segment import HEADER_BYTES, SlotCorrupt, check_blocks, check_header, fold_digests
from kvstore.transport.base import slot_spans

_xxh3 = xxhash.xxh3_64_intdigest


class LandingDigests:
    """The checksum blocks of slots that arrive back to back in one buffer, hashed as they
    land. ``expected`` holds each slot's (key, payload length, checksum), in order."""

    def __init__(self, expected: Sequence[tuple[bytes, int, int]]) -> None:
        self._expected = expected
        # (slot, block start, block end), both offsets in the landing buffer, in order
        self._blocks: list[tuple[int, int, int]] = []
        self._starts: list[int] = []
        for j, (start, _end) in enumerate(slot_spans([HEADER_BYTES + n for _, n, _ in expected])):
            self._starts.append(start)
            self._blocks += [(j, start + HEADER_BYTES + a, start + HEADER_BYTES + b)
                             for a, b in check_blocks(expected[j][1])]
        self._next = 0  # the first block without its digest
        self._partial: xxhash.xxh3_64 | None = None  # that block's stream, once some of it is hashed
        self._upto = 0  # where the partial stream stops (landing-buffer offset)
        self._digests: list[list[int]] = [[] for _ in expected]

    def landed(self, buf: memoryview, pos: int) -> None:
        """Bytes ``[0, pos)`` of the landing buffer ``buf`` are in: hash what they add."""
        blocks, digests, n = self._blocks, self._digests, len(self._blocks)
        while self._next < n:
            if self._partial is None:  # whole blocks: the common case, kept tight
                k = self._next
                while k < n:
                    j, a, b = blocks[k]
                    if b > pos:
                        break
                    digests[j].append(_xxh3(buf[a:b]))
                    k += 1
                self._next = k
                if k == n:
                    return
            before = self._next
            self._stream(buf, 0, pos)  # a block that is in only in part
            if self._next == before:
                return

    def verdict(self, j: int, slot: memoryview) -> str:
        """Whether slot ``j`` (its complete bytes, ``slot``) is the expected chunk: ``ok``,
        ``slot_mismatches`` or ``checksum_failures`` (the client's counter names). What the
        transport did not report as landed is hashed here, from ``slot``."""
        blocks, n = self._blocks, len(self._blocks)
        while self._next < n and blocks[self._next][0] < j:  # a slot never handed over
            self._next += 1
            self._partial = None
        base = self._starts[j]
        while self._next < n and blocks[self._next][0] == j:
            self._stream(slot, base, base + len(slot))
        key, length, checksum = self._expected[j]
        try:
            check_header(slot, 0, key, length, checksum)
        except SlotCorrupt:
            return "slot_mismatches"
        return "ok" if fold_digests(self._digests[j]) == checksum else "checksum_failures"

    def _stream(self, view: memoryview, base: int, pos: int) -> None:
        """Hash the current block as far as ``pos`` (a landing-buffer offset; ``view`` holds
        the landing buffer from offset ``base``), finishing it if it is all there."""
        j, a, b = self._blocks[self._next]
        end = min(pos, b)
        if end <= a and end < b:  # none of it landed (an empty block lands with its slot's end)
            return
        if self._partial is None:
            if end == b:  # all of it at once
                self._digests[j].append(_xxh3(view[a - base : b - base]))
                self._next += 1
                return
            self._partial, self._upto = xxhash.xxh3_64(), a
        self._partial.update(view[self._upto - base : end - base])
        self._upto = end
        if end == b:
            self._digests[j].append(self._partial.intdigest())
            self._partial = None
            self._next += 1
