import os
import uuid

import pytest
import xxhash

from kvstore.segment import (
    CHECK_BLOCK,
    HEADER_BYTES,
    ChecksumMismatch,
    Segment,
    SlotCorrupt,
    check_blocks,
    check_slot,
    checksum,
    fold_digests,
)


@pytest.fixture
def seg():  # type: ignore[no-untyped-def]
    s = Segment.create(f"pdkv-test-{uuid.uuid4().hex[:8]}", 1 << 16)
    yield s
    s.close()
    assert not os.path.exists(s.path)


def test_sealed_slot_reads_back_from_another_mapping(seg: Segment) -> None:
    key = b"k" * 16
    seg.payload(0, 5)[:] = b"hello"
    digest = seg.seal(0, key, 5)
    reader = Segment.attach(seg.name)
    try:
        assert bytes(reader.verify(0, key, 5, digest)) == b"hello"
    finally:
        reader.close()
    assert os.path.exists(seg.path)  # a reader's close never unlinks the owner's segment


def test_wrong_key_torn_payload_and_invalidated_slot_are_rejected(seg: Segment) -> None:
    key = b"a" * 16
    seg.payload(128, 4)[:] = b"data"
    digest = seg.seal(128, key, 4)
    with pytest.raises(SlotCorrupt):
        seg.verify(128, b"b" * 16, 4, digest)
    seg.payload(128, 4)[:] = b"dat!"
    with pytest.raises(ChecksumMismatch):
        seg.verify(128, key, 4, digest)
    seg.payload(128, 4)[:] = b"data"
    seg.invalidate(128)  # payload intact, header cleared: still refused
    with pytest.raises(SlotCorrupt):
        seg.verify(128, key, 4, digest)
    with pytest.raises(SlotCorrupt):
        seg.verify(1 << 16, key, 4, digest)


def test_check_slot_on_pulled_bytes() -> None:
    name = f"pdkv-test-{uuid.uuid4().hex[:8]}"
    s = Segment.create(name, 4096)
    try:
        s.payload(0, 3)[:] = b"xyz"
        digest = s.seal(0, b"q" * 16, 3)
        raw = bytes(s.buf[: HEADER_BYTES + 3])
    finally:
        s.close()
    assert bytes(check_slot(memoryview(raw), 0, b"q" * 16, 3, digest)) == b"xyz"


def test_checksum_is_per_block_and_catches_a_change_in_any_block() -> None:
    one = os.urandom(CHECK_BLOCK)
    assert checksum(one) == xxhash.xxh3_64_intdigest(one)  # one block: plain xxh3-64
    big = bytearray(os.urandom(2 * CHECK_BLOCK + 100))
    blocks = check_blocks(len(big))
    assert blocks == [(0, CHECK_BLOCK), (CHECK_BLOCK, 2 * CHECK_BLOCK), (2 * CHECK_BLOCK, len(big))]
    digest = checksum(big)
    assert digest == fold_digests([xxhash.xxh3_64_intdigest(bytes(big[a:b])) for a, b in blocks])
    for at in (0, CHECK_BLOCK + 7, len(big) - 1):  # a flipped byte in each block
        big[at] ^= 1
        assert checksum(big) != digest
        big[at] ^= 1
    # Swapping two blocks keeps every block digest but not their order: still caught.
    swapped = big[CHECK_BLOCK : 2 * CHECK_BLOCK] + big[:CHECK_BLOCK] + big[2 * CHECK_BLOCK :]
    assert checksum(swapped) != digest
    assert check_blocks(0) == [(0, 0)] and checksum(b"") == xxhash.xxh3_64_intdigest(b"")


def test_an_owner_that_closes_under_a_live_view_still_removes_its_file() -> None:
    s = Segment.create(f"pdkv-test-{uuid.uuid4().hex[:8]}", 1 << 16)
    view = s.payload(0, 16)  # a slot's payload, still alive: the mapping cannot close yet
    with pytest.raises(BufferError):
        s.close()
    assert not os.path.exists(s.path), "the segment outlived its owner's close in /dev/shm"
    view[:4] = b"ok!!"  # the mapping goes with the last view, not before
    del view
