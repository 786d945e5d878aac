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
loop with its state in locals. The slots those blocks complete are judged in the same call
(their expected headers are packed once, up front, so a header check is one comparison of
bytes), and ``verdict`` is then a list lookup.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from itertools import accumulate, repeat

import xxhash

from kvstore.segment import CHECK_BLOCK, HEADER_BYTES, check_blocks, fold_digests, slot_head

_xxh3 = xxhash.xxh3_64_intdigest


class LandingDigests:
    """The checksum blocks of slots that arrive back to back in one buffer, hashed as they
    land. Per slot, in order: the key, payload length and checksum it must have."""

    def __init__(self, keys: Sequence[bytes], lengths: Sequence[int], checksums: Sequence[int]) -> None:
        self._sums = checksums
        # Where each slot starts in the landing buffer: its predecessors' headers and payloads.
        # Blocks in landing order (segment.check_blocks of each payload): block k spans
        # [_start[k], _end[k]) of the landing buffer; slot j's are _first[j] .. _first[j + 1] - 1.
        self._slot_at = list(accumulate(map(operator.add, repeat(HEADER_BYTES), lengths), initial=0))[:-1]
        if max(lengths, default=0) <= CHECK_BLOCK:  # one block a slot, the common case: C loops only
            self._start = list(map(operator.add, self._slot_at, repeat(HEADER_BYTES)))
            self._end = list(map(operator.add, self._start, lengths))
            self._first = list(range(len(lengths) + 1))
        else:
            self._start, self._end, self._first = [], [], []
            for at, n in zip(self._slot_at, lengths, strict=True):
                self._first.append(len(self._start))
                for a, b in check_blocks(n):
                    self._start.append(at + HEADER_BYTES + a)
                    self._end.append(at + HEADER_BYTES + b)
            self._first.append(len(self._start))
        self._heads = list(map(slot_head, keys, lengths, checksums))
        self._verdicts: list[str | None] = [None] * len(lengths)
        self._judged = 0  # the first slot without a verdict
        self._digests = [0] * len(self._start)
        self._next = 0  # the first block without its digest
        self._partial: xxhash.xxh3_64 | None = None  # that block's stream, once some of it is hashed
        self._upto = 0  # where the partial stream stops (landing-buffer offset)

    def landed(self, buf: memoryview, pos: int) -> None:
        """Bytes ``[0, pos)`` of the landing buffer ``buf`` are in: hash what they add, and
        judge the slots that are now complete."""
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
                    break
            before = self._next
            self._stream(buf, 0, pos)  # a block that is in only in part
            if self._next == before:
                break
        self._judge_upto(buf, 0)

    def verdict(self, j: int, slot: memoryview) -> str:
        """Whether slot ``j`` (its complete bytes, ``slot``) is the expected chunk: ``ok``,
        ``slot_mismatches`` or ``checksum_failures`` (the client's counter names). What the
        transport did not report as landed is hashed here, from ``slot``."""
        done = self._verdicts[j]
        if done is not None:
            return done
        first, last = self._first[j], self._first[j + 1]
        if self._next < first:  # slots never handed over: their blocks are skipped
            self._next, self._partial = first, None
            self._judged = j
        base = self._slot_at[j]
        while self._next < last:
            self._stream(slot, base, base + len(slot))
        self._judge_upto(slot, base)
        return self._verdicts[j] or "slot_mismatches"  # judged just above: never the fallback

    def _judge_upto(self, view: memoryview, base: int) -> None:
        """Give a verdict to every slot whose blocks all have their digests (``view`` holds
        the landing buffer from offset ``base``; those slots lie in it)."""
        j, first, done = self._judged, self._first, self._next
        heads, sums, digests, at, verdicts = self._heads, self._sums, self._digests, self._slot_at, self._verdicts
        while j < len(verdicts) and first[j + 1] <= done:
            a = at[j] - base
            if view[a : a + len(heads[j])].tobytes() != heads[j]:
                verdicts[j] = "slot_mismatches"
            else:
                k, end = first[j], first[j + 1]
                digest = digests[k] if end - k == 1 else fold_digests(digests[k:end])
                verdicts[j] = "ok" if digest == sums[j] else "checksum_failures"
            j += 1
        self._judged = j

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
