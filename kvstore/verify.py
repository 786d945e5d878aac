"""Checksums taken while a remote read lands, so a slot is verified the moment it is in.

A network read fills the landing buffer front to back. Hashing each piece right after the
receive that brought it reads it from the cache of the core that just wrote it (xxh3 runs
as a stream: a checksum block split over several receives gets the digest it would get in
one go); hashing a whole multi-MiB slot afterwards, or on a helper thread (a third busy
thread on a two-core node, beside the sender and the receiver), reads it from DRAM again.
With the digests taken, verifying a slot is a header check and a fold.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from kvstore.segment import HEADER_BYTES, SlotCorrupt, block_digest, check_blocks, check_header, fold_digests
from kvstore.transport.base import slot_spans


class LandingDigests:
    """The checksum blocks of slots that arrive back to back in one buffer (``lengths``:
    each slot's header + payload bytes), hashed as they land."""

    def __init__(self, lengths: Sequence[int]) -> None:
        # (slot, slot start in the buffer, block start, block end): block offsets within the slot
        self._blocks: list[tuple[int, int, int, int]] = []
        for j, (start, end) in enumerate(slot_spans(lengths)):
            self._blocks += [(j, start, HEADER_BYTES + a, HEADER_BYTES + b)
                             for a, b in check_blocks(end - start - HEADER_BYTES)]
        self._next = 0  # the first block without its digest
        self._partial: xxhash.xxh3_64 | None = None  # that block's stream, once some of it is hashed
        self._upto = 0  # where the partial stream stops, in the block's slot
        self._digests: list[list[int]] = [[] for _ in lengths]

    def landed(self, buf: memoryview, pos: int) -> None:
        """Bytes ``[0, pos)`` of the landing buffer ``buf`` are in: hash what they add."""
        blocks = self._blocks
        while self._next < len(blocks):
            _, start, a, b = blocks[self._next]
            if not self._take(buf[start : start + b], min(pos - start, b)):
                return

    def verdict(self, j: int, slot: memoryview, key: bytes, length: int, checksum: int) -> str:
        """Whether slot ``j`` (its complete bytes) is the expected chunk: ``ok``,
        ``slot_mismatches`` or ``checksum_failures`` (the client's counter names). What the
        transport did not report as landed is hashed here, from ``slot``."""
        blocks = self._blocks
        while self._next < len(blocks) and blocks[self._next][0] < j:  # a slot never handed over
            self._next += 1
            self._partial = None
        while self._next < len(blocks) and blocks[self._next][0] == j:
            self._take(slot, blocks[self._next][3])
        try:
            check_header(slot, 0, key, length, checksum)
        except SlotCorrupt:
            return "slot_mismatches"
        return "ok" if fold_digests(self._digests[j]) == checksum else "checksum_failures"

    def _take(self, slot: memoryview, end: int) -> bool:
        """Hash the current block's bytes of ``slot`` up to ``end`` (slot offsets); True when
        that finished the block."""
        j, _, a, b = self._blocks[self._next]
        if end <= a and end < b:  # none of it landed (an empty block lands with its slot's end)
            return False
        if self._partial is None and end >= b:  # the whole block at once (the common case)
            self._digests[j].append(block_digest(slot[a:b]))
        else:
            if self._partial is None:
                self._partial, self._upto = xxhash.xxh3_64(), a
            self._partial.update(slot[self._upto : min(end, b)])
            self._upto = min(end, b)
            if self._upto < b:
                return False
            self._digests[j].append(int(self._partial.intdigest()))
            self._partial = None
        self._next += 1
        return True
