"""Checksums taken while a remote read lands, so a slot is verified the moment it is in.

A network read fills the landing buffer front to back. Hashing each piece right after the
receive that brought it reads it from the cache of the core that just wrote it (xxh3 runs
as a stream: a checksum block split over several receives gets the digest it would get in
one go); hashing a whole multi-MiB slot afterwards, or on a helper thread (a third busy
thread on a two-core node, beside the sender and the receiver), reads it from DRAM again.
With the digests taken, verifying a slot is a header check and a fold.

This runs once per block and once per slot of every remote read: at 64 KiB chunks that is
1,024 of each per 64 MiB. So the state is flat lists of ints (no object per block or slot:
a tuple and a list per slot made the garbage collector run several times a read, which cost
more than the hashing), and the common case, whole blocks inside what landed, is one tight
loop with its state in locals.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from kvstore.segment import CHECK_BLOCK, HEADER_BYTES, SlotCorrupt, check_blocks, check_header, fold_digests

_xxh3 = xxhash.xxh3_64_intdigest


class LandingDigests:
    """The checksum blocks of slots that arrive back to back in one buffer, hashed as they
    land. Per slot, in order: the key, payload length and checksum it must have."""

    def __init__(self, keys: Sequence[bytes], lengths: Sequence[int], checksums: Sequence[int]) -> None:
        self._keys, self._lengths, self._sums = keys, lengths, checksums
        # Blocks in landing order (segment.check_blocks of each payload): block k spans
        # [_start[k], _end[k]) of the landing buffer; slot j's are _first[j] .. _first[j + 1] - 1.
        self._start: list[int] = []
        self._end: list[int] = []
        self._first: list[int] = []
        self._slot_at: list[int] = []  # where each slot starts in the landing buffer
        pos = 0
        for n in lengths:
            self._slot_at.append(pos)
            self._first.append(len(self._start))
            base = pos + HEADER_BYTES
            if n <= CHECK_BLOCK:  # one block, the common case: no tuple made for it
                self._start.append(base)
                self._end.append(base + n)
            else:
                for a, b in check_blocks(n):
                    self._start.append(base + a)
                    self._end.append(base + b)
            pos = base + n
        self._first.append(len(self._start))
        self._digests = [0] * len(self._start)
        self._next = 0  # the first block without its digest
        self._partial: xxhash.xxh3_64 | None = None  # that block's stream, once some of it is hashed
        self._upto = 0  # where the partial stream stops (landing-buffer offset)

    def landed(self, buf: memoryview, pos: int) -> None:
        """Bytes ``[0, pos)`` of the landing buffer ``buf`` are in: hash what they add."""
        starts, ends, digests, n = self._start, self._end, self._digests, len(self._end)
        while self._next < n:
            if self._partial is None:  # whole blocks: the common case, kept tight
                k = self._next
                while k < n:
                    b = ends[k]
                    if b > pos:
                        break
                    digests[k] = _xxh3(buf[starts[k] : b])
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
        first, last = self._first[j], self._first[j + 1]
        if self._next < first:  # slots never handed over: their blocks are skipped
            self._next, self._partial = first, None
        base = self._slot_at[j]
        while self._next < last:
            self._stream(slot, base, base + len(slot))
        try:
            check_header(slot, 0, self._keys[j], self._lengths[j], self._sums[j])
        except SlotCorrupt:
            return "slot_mismatches"
        digest = self._digests[first] if last - first == 1 else fold_digests(self._digests[first:last])
        return "ok" if digest == self._sums[j] else "checksum_failures"

    def _stream(self, view: memoryview, base: int, pos: int) -> None:
        """Hash the current block as far as ``pos`` (a landing-buffer offset; ``view`` holds
        the landing buffer from offset ``base``), finishing it if it is all there."""
        k = self._next
        a, b = self._start[k], self._end[k]
        end = min(pos, b)
        if end <= a and end < b:  # none of it landed (an empty block lands with its slot's end)
            return
        if self._partial is None:
            if end == b:  # all of it at once
                self._digests[k] = _xxh3(view[a - base : b - base])
                self._next = k + 1
                return
            self._partial, self._upto = xxhash.xxh3_64(), a
        self._partial.update(view[self._upto - base : end - base])
        self._upto = end
        if end == b:
            self._digests[k] = self._partial.intdigest()
            self._partial = None
            self._next = k + 1
