"""The device-independent parts of the CUDA KV path: a writer that took the payload's
checksum while writing it (kvstore/gpu_path.py hashes its GPU copy) seals with it, and the
seal then never reads the payload; its one-launch gather/scatter kernel, under Triton's
interpreter. The copies themselves run only on a GPU (tests/gpu, bench/gpu/kvpath.py)."""

import os
import subprocess
import sys
import uuid

import pytest

from kvstore import segment as segmod
from kvstore.segment import CHECK_BLOCK, Segment, checksum
from tests.unit.cuda_stubs import CUDA_AS_NO_OPS


@pytest.fixture
def seg():  # type: ignore[no-untyped-def]
    s = Segment.create(f"pdkv-test-{uuid.uuid4().hex[:8]}", 8 * CHECK_BLOCK)
    yield s
    s.close()


def test_seal_writes_the_given_digest_without_hashing(seg: Segment, monkeypatch: pytest.MonkeyPatch) -> None:
    key, n = b"k" * 16, 3 * CHECK_BLOCK + 5
    payload = seg.payload(0, n)
    payload[:] = os.urandom(n)
    real = checksum(payload)

    def no_hashing(data: object) -> int:
        raise AssertionError("the seal hashed a payload whose digest it was given")

    monkeypatch.setattr(segmod, "checksum", no_hashing)
    assert seg.seal(0, key, n, real) == real
    monkeypatch.undo()
    assert bytes(seg.verify(0, key, n, real)) == bytes(payload)


def test_seal_without_a_digest_hashes_as_before(seg: Segment) -> None:
    key, n = b"k" * 16, CHECK_BLOCK + 7
    payload = seg.payload(0, n)
    payload[:] = os.urandom(n)
    assert seg.seal(0, key, n) == checksum(payload)
    assert seg.seal(0, key, n, None) == checksum(payload)


_COPY_ROWS_CHECK = """
import torch
from kvstore.gpu_path import _copy_rows, staging_rows
# 3 layers of 9 blocks, rows of 6 words, each layer its own allocation and its own row stride
layers = [torch.randint(-2**62, 2**62, (9, 6 + pad), dtype=torch.int64) for pad in (0, 2, 5)]
table = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64)
strides = torch.tensor([t.stride(0) for t in layers], dtype=torch.int64)

def launch(chunks, staging, n, to_staging, flags=None):
    ids, pos = (torch.from_numpy(r) for r in staging_rows(chunks, 3, n))
    _copy_rows[(3 * len(ids), 2)](table, strides, ids, pos, staging, len(ids), n, 6,
                                  ids if flags is None else torch.tensor(flags), 3 * n,
                                  TO_STAGING=to_staging, TILE=4, FLAGGED=flags is not None)

# one request of two chunks of 3 blocks, gathered in one launch: [chunk][layer][block]
chunks, n = [[7, 2, 5], [0, 8, 3]], 3
staging = torch.zeros(2 * 3 * n * 6, dtype=torch.int64)
launch([(0, chunks[0], 0), (1, chunks[1], 0)], staging, n, True)
want = torch.stack([torch.stack([t[torch.tensor(c), :6] for t in layers]) for c in chunks]).reshape(-1)
assert torch.equal(staging, want), "gather"
# scatter only the second chunk's last two blocks (skip 1) into blocks 1 and 6 of every layer
before = [t.clone() for t in layers]
launch([(1, [1, 6], 1)], staging, n, False)
for t, b in zip(layers, before):
    assert torch.equal(t[1, :6], b[8, :6]) and torch.equal(t[6, :6], b[3, :6]), "scatter"
    keep = [0, 2, 3, 4, 5, 7, 8]
    assert torch.equal(t[keep], b[keep]) and torch.equal(t[:, 6:], b[:, 6:]), "wrote outside its rows"
# a flagged scatter of both chunks (a load's, queued before the verdicts are read): chunk 0's
# flag is 0, so its target blocks 4, 0, 6 keep every byte; chunk 1 (skip 1) lands in 2 and 5
before = [t.clone() for t in layers]
launch([(0, [4, 0, 6], 0), (1, [2, 5], 1)], staging, n, False, flags=[0, 1])
for t, b in zip(layers, before):
    assert torch.equal(t[2, :6], b[8, :6]) and torch.equal(t[5, :6], b[3, :6]), "flagged scatter"
    keep = [0, 1, 3, 4, 6, 7, 8]
    assert torch.equal(t[keep], b[keep]) and torch.equal(t[:, 6:], b[:, 6:]), "a chunk flagged 0 was written"
# every flag 0: nothing at all is written
before = [t.clone() for t in layers]
launch([(0, [4, 0, 6], 0), (1, [2, 5], 1)], staging, n, False, flags=[0, 0])
assert all(torch.equal(t, b) for t, b in zip(layers, before)), "a scatter with no match wrote"
print("OK")
"""


def test_one_launch_gather_and_scatter_move_exactly_the_chunks_rows() -> None:
    """kvstore.gpu_path._copy_rows under Triton's interpreter (a child process: Triton reads
    TRITON_INTERPRET at import), fed by ``staging_rows`` as ``GpuKVPath`` feeds it: two chunks
    of a request in one launch, layers with different row strides, a tile that splits a row,
    a scatter of one chunk that skips its leading block and touches nothing else, and a
    flagged scatter (a load's) that leaves every block of a chunk flagged 0 untouched."""
    pytest.importorskip("triton", reason="triton is not installed")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", _COPY_ROWS_CHECK], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "OK", run.stderr[-3000:]


def test_staging_rows_put_each_chunk_where_its_slot_starts() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    from kvstore.gpu_path import staging_rows

    # 2 layers, 4 blocks per chunk: chunk c starts at row c * 2 * 4; a skip moves its ids on
    assert staging_rows([(0, [9, 8, 7, 6], 0), (1, [1, 2, 3, 4], 0)], 2, 4).tolist() == [
        [9, 8, 7, 6, 1, 2, 3, 4], [0, 1, 2, 3, 8, 9, 10, 11]]
    assert staging_rows([(2, [5, 6], 2)], 2, 4).tolist() == [[5, 6], [18, 19]]
    assert staging_rows([(0, [7], 3), (1, (1, 2, 3), 1), (3, [], 4)], 2, 4).tolist() == [[7, 1, 2, 3], [3, 9, 10, 11]]
    assert staging_rows([], 2, 4).tolist() == [[], []]


def test_the_index_is_written_in_place_into_a_larger_buffer() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    import numpy as np

    from kvstore.gpu_path import staging_rows, staging_rows_into

    for chunks in ([(c, list(range(8 * c, 8 * c + 8)), 0) for c in range(16)], [(0, [7], 3), (1, (1, 2, 3), 1)],
                   [(1, [4, 2, 5], 0), (0, [3], 1), (2, [9, 8], 0)]):
        out = np.full(300, -1, np.int64)
        rows = staging_rows_into(chunks, 16, 8, out)
        assert out[: 2 * rows].tolist() == staging_rows(chunks, 16, 8).reshape(-1).tolist()
        assert (out[2 * rows :] == -1).all()  # nothing past the index is touched (a load's checksums go there)


def test_slots_at_one_pitch_are_one_copy_and_the_rest_go_one_by_one() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    from kvstore.gpu_path import _pitched_runs

    w = 100
    # back to back at pitch 164 (header + payload), then a gap, then two more at that pitch
    assert _pitched_runs([0, 164, 328, 1000, 1164], w) == [(0, 3, 164), (3, 5, 164)]
    # slots out of order, or closer than a row: never one 2D copy (rows would overlap)
    assert _pitched_runs([500, 0], w) == [(0, 1, w), (1, 2, w)]
    assert _pitched_runs([0, 50, 100], w) == [(0, 1, w), (1, 2, w), (2, 3, w)]
    assert _pitched_runs([0, 164, 300], w) == [(0, 2, 164), (2, 3, w)]
    assert _pitched_runs([7], w) == [(0, 1, w)]
    assert _pitched_runs([], w) == []


def test_one_hash_launch_covers_every_chunk_when_blocks_align() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    from kvstore.gpu_path import GROUP_BYTES, _groups, _hash_block

    assert _hash_block(4 * CHECK_BLOCK) == CHECK_BLOCK  # whole checksum blocks: they line up
    assert _hash_block(256 << 10) == 256 << 10  # one block per chunk: the chunk is the block
    assert _hash_block(CHECK_BLOCK + 4096) is None  # a partial last block: one launch per chunk
    assert _hash_block(3000) is None  # not whole kiB-blocks
    assert _groups(5, 4 << 20) == [range(0, 5)]
    per = GROUP_BYTES // (64 << 20)
    assert _groups(per + 1, 64 << 20) == [range(0, per), range(per, per + 1)]
    assert _groups(2, GROUP_BYTES * 2) == [range(0, 1), range(1, 2)]  # never an empty group


_BATCH_CHECK = CUDA_AS_NO_OPS + """
import gc, uuid
import torch

from kvstore import gpu_path, segment as segmod
from kvstore.segment import HEADER_BYTES, Segment
gpu_path._gpu_checksums_work = lambda device: True

def run(row_elems, layers, per, n_chunks, fused, group_bytes=None, device_verdicts=True):
    torch.manual_seed(0)
    nb = 4 * n_chunks * per  # saved from the first half, loaded into the second
    blocks = [torch.randn(nb, row_elems).to(torch.bfloat16) for _ in range(layers)]
    path = gpu_path.GpuKVPath(blocks)
    assert path.fused_copies, "self-check"
    path.fused_copies = fused
    path.device_verdicts = device_verdicts
    if group_bytes: gpu_path.GROUP_BYTES = group_bytes
    nbytes = layers * per * row_elems * 2
    seg = Segment.create(f"pdkv-test-{uuid.uuid4().hex[:8]}", 1 << 20)
    try:
        slot = HEADER_BYTES + nbytes
        payloads = [seg.payload(c * slot, nbytes) for c in range(n_chunks)]
        src = [tuple(range(c * per, (c + 1) * per))[::-1] for c in range(n_chunks)]
        dig = path.extract_many(src, payloads)
        assert dig == [segmod.checksum(p) for p in payloads], (dig, [segmod.checksum(p) for p in payloads])
        for c in range(n_chunks):
            want = torch.stack([b[list(src[c])] for b in blocks]).reshape(-1).view(torch.uint8)
            assert bytes(payloads[c]) == want.numpy().tobytes(), c
        dst = [tuple(range(nb // 2 + c * per, nb // 2 + (c + 1) * per)) for c in range(n_chunks)]
        before = [b.clone() for b in blocks]
        # chunk 0 loads with skip 1 (first block skipped), the others whole; one damaged
        payloads[1][5] ^= 0xFF
        targets = [(dst[0][1:], 1)] + [(d, 0) for d in dst[1:]]
        ok = path.load_many(payloads, dig, targets, per)
        assert ok == [c != 1 for c in range(n_chunks)], ok
        for b, was in zip(blocks, before):
            assert torch.equal(b[list(dst[0][1:])], was[list(src[0][1:])])
            assert torch.equal(b[dst[0][0]], was[dst[0][0]])
            assert torch.equal(b[list(dst[1])], was[list(dst[1])]), "damaged chunk written"
            for c in range(2, n_chunks):
                assert torch.equal(b[list(dst[c])], was[list(src[c])])
        payloads[1][5] ^= 0xFF
        assert path.load_checked(payloads[1], dig[1], dst[1], per, 0)
        path.inject(payloads[2], dst[0], per, 0)
        for b, was in zip(blocks, before):
            assert torch.equal(b[list(dst[1])], was[list(src[1])])
            assert torch.equal(b[list(dst[0])], was[list(src[2])])
        # every chunk damaged: none matches, and not one block of the cache changes
        for c in range(n_chunks): payloads[c][7] ^= 0x01
        before = [b.clone() for b in blocks]
        assert path.load_many(payloads, dig, [(d, 0) for d in src], per) == [False] * n_chunks
        assert all(torch.equal(b, was) for b, was in zip(blocks, before)), "a damaged chunk was written"
        for c in range(n_chunks): payloads[c][7] ^= 0x01
    finally:
        payloads = path = None
        gc.collect()  # the payload views go before their segment
        seg.close()
        gpu_path.GROUP_BYTES = 256 << 20

run(1024, 2, 2, 3, True)            # 8 KiB chunks: one launch, block = chunk
run(1024, 2, 2, 3, False)           # per-layer fallback
run(1024, 2, 2, 3, True, device_verdicts=False)  # one launch, the host reads the verdicts first
run(1024, 2, 2, 4, True, 16 << 10)  # groups of 2 chunks
run(1024, 2, 2, 7, True)            # 7 chunks, a damaged one among them
run(500, 2, 2, 3, True)             # 4000-byte chunks: one hash launch per chunk
print("OK")
"""


def test_a_requests_chunks_go_through_one_gather_one_hash_and_one_scatter() -> None:
    """GpuKVPath.extract_many / load_many on CPU tensors, its kernels under Triton's
    interpreter and CUDA streams as no-ops (a child process): each chunk's sealed digest is
    its payload's, every chunk lands in its own blocks (the first after a skip), a damaged
    chunk is refused and writes nothing while the others load, a request of damaged chunks
    writes nothing at all; with one hash launch (chunk = one checksum block), one per chunk
    (a chunk of 4,000 B), per-layer copies, the verdicts read by the scatter on the device or
    by the host first, and a request split into staging groups. The copies' speed is
    measured on a GPU (bench/gpu/kvpath.py)."""
    pytest.importorskip("triton", reason="triton is not installed")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", _BATCH_CHECK], cwd=root, env=env, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]
