import os
import uuid

import pytest

from kvstore.segment import HEADER_BYTES, ChecksumMismatch, Segment, SlotCorrupt, check_slot


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
