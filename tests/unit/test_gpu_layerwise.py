"""The layer-wise save's copies on CPU: ``kvstore.gpu_layerwise.LayerwiseSave`` under Triton's
interpreter with CUDA streams as no-ops (a child process: Triton reads TRITON_INTERPRET at
import), the pitched copy done row by row. Its bytes and checksums equal the whole-chunk
save's (``GpuKVPath.extract_many``) for layers in either order; steps it cannot take are
refused (tests/gpu/layerwise_check.py, which tests/gpu runs on the H200 too)."""

import os
import subprocess
import sys

import pytest

from tests.unit.cuda_stubs import CUDA_AS_NO_OPS

_CHECK = CUDA_AS_NO_OPS + """
from kvstore import gpu_path
gpu_path._gpu_checksums_work = lambda device: True
from tests.gpu.layerwise_check import check
check("cpu")                       # 8 KiB chunks: one hash launch, block = chunk
check("cpu", layers=5, per=1, n_chunks=3, row_elems=2000)  # groups of 2, 2, 1; a hash launch per chunk
print("OK")
"""


def test_layer_by_layer_gives_the_whole_chunk_saves_bytes_and_checksums() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", _CHECK], cwd=root, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]
