"""How a store read hands chunks over: each slot judged (``ok`` or the client's counter name
for why not) and its payload passed to the caller's ``on_chunk``.

``read_split`` is the same-node read of a run of large slots: two threads copy and hash its
checksum blocks, each block hashed right after it was copied, from that core's cache.
``deliver_slot`` / ``deliver_group`` verify slots whole; ``hand_over`` passes on payloads a
remote read already verified as they landed (``kvstore.verify``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, wait

from kvstore.metadata import ChunkLocation
from kvstore.segment import (
    HEADER_BYTES,
    ChecksumMismatch,
    SlotCorrupt,
    block_digest,
    check_blocks,
    check_header,
    check_slot,
    copy_into,
    fold_digests,
)
from kvstore.transport.base import slot_spans

OnChunk = Callable[[int, memoryview], None]  # on_chunk(i, payload): chunk i's verified payload


def read_split(
    buf: memoryview, helper: Executor, run: list[int], lengths: list[int], keys: Sequence[bytes],
    locs: Sequence[ChunkLocation], on_chunk: OnChunk, dest: memoryview | None,
) -> list[tuple[int, str]]:
    """Verify (and copy into ``dest``) a same-node run on two threads, half of its
    checksum blocks each, then hand the good chunks over in order; every slot's verdict.

    Each thread hashes a block right after it copied it, from its own core's cache, so a
    verified read costs two passes over memory (read, write) like a plain copy, spread
    over both cores (docs/kvstore.md has the measurements)."""
    spans = slot_spans(lengths)
    verdicts: dict[int, str] = {}
    work: list[tuple[int, int, int]] = []  # (j, a, b): payload bytes a..b of slot run[j]
    for j, i in enumerate(run):
        loc = locs[i]
        try:
            check_header(buf, loc.offset, keys[i], loc.length, loc.checksum)
        except SlotCorrupt:
            verdicts[i] = "slot_mismatches"
            continue
        work += [(j, a, b) for a, b in check_blocks(loc.length)]
    digests: dict[tuple[int, int], int] = {}

    def payload(j: int) -> memoryview:  # where slot run[j]'s payload is delivered from
        if dest is None:
            start = locs[run[j]].offset + HEADER_BYTES
            return buf[start : start + lengths[j] - HEADER_BYTES]
        start = spans[j][0] + HEADER_BYTES
        return dest[start : start + lengths[j] - HEADER_BYTES]

    def part(items: Iterator[tuple[int, int, int]]) -> None:
        for j, a, b in items:
            block = payload(j)[a:b]
            if dest is not None:
                src = locs[run[j]].offset + HEADER_BYTES
                copy_into(block, buf[src + a : src + b])
            digests[(j, a)] = block_digest(block)

    # Both threads take blocks from one queue (a list iterator: its next() is atomic),
    # so a thread the OS parks for a while leaves its share to the other.
    queue = iter(work)
    theirs = helper.submit(part, queue)
    try:
        part(queue)
    finally:
        wait([theirs])  # its slots stay pinned and its buffer alive until it is done
    theirs.result()
    for j, i in enumerate(run):
        if i in verdicts:
            continue
        loc = locs[i]
        if fold_digests([digests[(j, a)] for a, _ in check_blocks(loc.length)]) != loc.checksum:
            verdicts[i] = "checksum_failures"
            continue
        if dest is not None:
            copy_into(dest[spans[j][0] : spans[j][0] + HEADER_BYTES], buf[loc.offset : loc.offset + HEADER_BYTES])
        on_chunk(i, payload(j))
        verdicts[i] = "ok"
    return list(verdicts.items())


def deliver_slot(i: int, key: bytes, loc: ChunkLocation, slot: memoryview, on_chunk: OnChunk) -> str:
    """Verify one slot and hand its payload over; returns the verdict's counter name."""
    try:
        payload = check_slot(slot, 0, key, loc.length, loc.checksum)
    except ChecksumMismatch:
        return "checksum_failures"
    except SlotCorrupt:
        return "slot_mismatches"
    on_chunk(i, payload)
    return "ok"


def deliver_group(
    group: list[tuple[int, memoryview]], keys: Sequence[bytes], locs: Sequence[ChunkLocation], on_chunk: OnChunk,
) -> list[tuple[int, str]]:
    """Verify a group of slots and hand their payloads over (the helper thread's share of
    a same-node run copied out of the segment)."""
    return [(i, deliver_slot(i, keys[i], locs[i], slot, on_chunk)) for i, slot in group]


def hand_over(
    group: list[tuple[int, memoryview]], keys: Sequence[bytes], locs: Sequence[ChunkLocation], on_chunk: OnChunk,
) -> list[tuple[int, str]]:
    """Hand verified payloads over (the helper thread's share of a remote run)."""
    for i, payload in group:
        on_chunk(i, payload)
    return [(i, "ok") for i, _ in group]
