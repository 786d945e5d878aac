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
from kvstore.gpu_path import _copy_rows
# 3 layers of 9 blocks, rows of 6 words, each layer its own allocation and its own row stride
layers = [torch.randint(-2**62, 2**62, (9, 6 + pad), dtype=torch.int64) for pad in (0, 2, 5)]
table = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64)
strides = torch.tensor([t.stride(0) for t in layers], dtype=torch.int64)
ids, n_blocks = torch.tensor([7, 2, 5], dtype=torch.int64), 3
staging = torch.zeros(3 * n_blocks * 6, dtype=torch.int64)
_copy_rows[(3 * 3, 2)](table, strides, ids, staging, 3, n_blocks, 0, 6, TO_STAGING=True, TILE=4)
want = torch.stack([t[ids, :6] for t in layers]).reshape(-1)
assert torch.equal(staging, want), "gather"
# scatter the chunk's last two blocks (skip 1) into blocks 0 and 8 of every layer
before = [t.clone() for t in layers]
_copy_rows[(3 * 2, 2)](table, strides, torch.tensor([0, 8]), staging, 2, n_blocks, 1, 6, TO_STAGING=False, TILE=4)
for t, b in zip(layers, before):
    assert torch.equal(t[0, :6], b[2, :6]) and torch.equal(t[8, :6], b[5, :6]), "scatter"
    assert torch.equal(t[1:8], b[1:8]) and torch.equal(t[:, 6:], b[:, 6:]), "wrote outside its rows"
print("OK")
"""


def test_one_launch_gather_and_scatter_move_exactly_the_chunks_rows() -> None:
    """kvstore.gpu_path._copy_rows under Triton's interpreter (a child process: Triton reads
    TRITON_INTERPRET at import): layers with different row strides, a tile that splits a row,
    a scatter that skips the chunk's leading block and touches nothing else."""
    pytest.importorskip("triton", reason="triton is not installed")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", _COPY_ROWS_CHECK], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "OK", run.stderr[-3000:]
