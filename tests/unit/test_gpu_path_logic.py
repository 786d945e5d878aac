"""The device-independent parts of the CUDA KV path: how a payload is split into copies, and
the segment hooks it uses (digest hints for the seal, parallel checksums). The copies
themselves run only on a GPU (tests/gpu, bench/gpu/kvpath.py)."""

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvstore import gpu_path
from kvstore import segment as segmod
from kvstore.gpu_path import piece_of, piece_spans
from kvstore.segment import CHECK_BLOCK, HEADER_BYTES, Segment, check_blocks, checksum


@pytest.fixture
def seg():  # type: ignore[no-untyped-def]
    s = Segment.create(f"pdkv-test-{uuid.uuid4().hex[:8]}", 8 * CHECK_BLOCK)
    yield s
    segmod.clear_digest_hints()
    segmod.parallel_checksums(None)
    s.close()


@pytest.mark.parametrize("nbytes", [1, CHECK_BLOCK, 3 * CHECK_BLOCK + 5, 9 * CHECK_BLOCK])
def test_pieces_cover_the_payload_in_whole_check_blocks(nbytes: int) -> None:
    piece = 2 * CHECK_BLOCK
    spans = piece_spans(nbytes, piece)
    assert spans[0][0] == 0 and spans[-1][1] == nbytes
    assert all(a == b_prev for (a, _), (_, b_prev) in zip(spans[1:], spans, strict=False))
    for a, b in check_blocks(nbytes):  # every checksum block lies inside one copy
        assert spans[piece_of(a, piece)][0] <= a and b <= spans[piece_of(a, piece)][1]
    with pytest.raises(ValueError):
        piece_spans(nbytes, CHECK_BLOCK + 1)


def test_seal_takes_the_hinted_digest_once(seg: Segment) -> None:
    key, n = b"k" * 16, 3 * CHECK_BLOCK
    payload = seg.payload(0, n)
    payload[:] = os.urandom(n)
    real = checksum(payload)
    segmod.hint_digest(payload, real)
    assert seg.seal(0, key, n) == real
    assert not segmod._digest_hints  # used up
    assert bytes(seg.verify(0, key, n, real)) == bytes(payload)


def test_seal_without_a_hint_hashes_as_before(seg: Segment) -> None:
    key, n = b"k" * 16, CHECK_BLOCK + 7
    payload = seg.payload(0, n)
    payload[:] = os.urandom(n)
    other = seg.payload(4 * CHECK_BLOCK, n)
    segmod.hint_digest(other, 12345)  # a hint for another slot is not taken here
    assert seg.seal(0, key, n) == checksum(payload)
    assert segmod._digest_hints


def test_parallel_checksums_equal_the_serial_ones(seg: Segment) -> None:
    n = 5 * CHECK_BLOCK + 3
    data = seg.payload(HEADER_BYTES, n)
    data[:] = os.urandom(n)
    serial = checksum(data)
    with ThreadPoolExecutor(3) as pool:
        calls: list[int] = []

        def run(blocks: list[memoryview]) -> list[int]:
            calls.append(len(blocks))
            return list(pool.map(segmod.block_digest, blocks))

        segmod.parallel_checksums(run)
        assert checksum(data) == serial
        assert checksum(data[:100]) == checksum(bytes(data[:100]))  # one block: not handed over
        assert calls == [6]


def test_gil_free_block_digest_equals_the_segment_one() -> None:
    data = memoryview(bytearray(os.urandom(CHECK_BLOCK + 77)))
    for view in (data, data[3:1000], data[:0], memoryview(bytes(data[:500]))):
        assert gpu_path.block_digest(view) == segmod.block_digest(view)
