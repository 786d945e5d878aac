"""kvstore/gpu_xxh3.py is bit-exact with xxhash's xxh3-64 for every length it can meet.

On a CUDA machine the kernels run on the GPU (tools/gpu/run-tests.sh runs this file there);
elsewhere under Triton's interpreter (numpy on the CPU), in one child process: Triton reads
``TRITON_INTERPRET`` when it is imported, so the flag cannot be turned on inside a pytest
process that may have imported it already. The interpreter takes ~5 s per MiB here, so most
cases use a small ``block`` (the kernels take any multiple of 1 KiB: the same code as at
1 MiB, with fewer scramble steps) and one case the real ``CHECK_BLOCK``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from typing import Any

import pytest
import xxhash

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: the GPU checksum kernels cannot be checked here")

from kvstore.segment import CHECK_BLOCK, check_blocks, checksum, fold_digests  # noqa: E402

CUDA = torch.cuda.is_available()
SMALL = 4096  # the interpreter's block: 3 scrambled kiB-blocks, then the partial one
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Every short-input formula and its edges (1-3, 4-8, 9-16, 17-128 with 1-4 pairs, 129-240),
# the long loop's edges (241, one stripe, exactly one kiB-block, one more byte, 1,087/1,088/
# 1,089: the partial block's stripe count), whole and odd multi-block lengths.
LENGTHS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 31, 32, 33, 63, 64, 65, 96, 97, 127, 128, 129, 130,
           143, 144, 200, 239, 240, 241, 255, 256, 257, 1023, 1024, 1025, 1087, 1088, 1089, 3001,
           SMALL - 1, SMALL, SMALL + 1, SMALL + 240, SMALL + 241, 3 * SMALL + 17, 5 * SMALL]
# (name, length, fill byte or None for random, block)
CASES: list[tuple[str, int, int | None, int]] = (
    [(f"random-{n}", n, None, SMALL) for n in LENGTHS]
    + [(f"const{b:02x}-{n}", n, b, SMALL) for b in (0x00, 0xFF) for n in (3, 8, 100, 240, 1024, 2 * SMALL + 999)]
    + [("check-block-plus-13", CHECK_BLOCK + 13, None, CHECK_BLOCK)]
    # 32 KiB blocks: 16-31 scramble steps, so the chain's unrolled loop runs once, plus its rest
    + [(f"unrolled-{n}", n, None, 32 << 10) for n in (17 * 1024 + 1, 32 << 10, 3 * (32 << 10) + 4097)]
)
GPU_ONLY = [(f"mib-{n}", n, None, CHECK_BLOCK)
            for n in (CHECK_BLOCK - 1, 4 * CHECK_BLOCK, 3 * CHECK_BLOCK + 241, 7 * CHECK_BLOCK + 99991)]


# Cases also hashed from an unaligned start (aligned data is read a word at a time)
UNALIGNED = ["random-241", "random-1089", f"random-{3 * SMALL + 17}", "unrolled-17409"]


def case_bytes(n: int, fill: int | None) -> bytes:
    return bytes([fill]) * n if fill is not None else random.Random(n).randbytes(n)


def reference(data: bytes, block: int) -> list[int]:
    return [xxhash.xxh3_64_intdigest(data[a : a + block]) for a in range(0, max(len(data), 1), block)]


def kernel_digests(cases: list[tuple[str, int, int | None, int]], device: str) -> dict[str, list[int]]:
    """Each case's block digests from kvstore.gpu_xxh3 on ``device`` (what the child runs)."""
    from kvstore import gpu_xxh3

    out = {}
    for name, n, fill, block in cases:
        t = torch.frombuffer(bytearray(case_bytes(n, fill)), dtype=torch.uint8).to(device)
        out[name] = gpu_xxh3.as_unsigned(gpu_xxh3.block_digests(t, block))
        if name in UNALIGNED:  # the same bytes one byte past an 8-byte boundary: read byte by byte
            t = torch.frombuffer(bytearray(b"\0" + case_bytes(n, fill)), dtype=torch.uint8).to(device)[1:]
            out[name + "@1"] = gpu_xxh3.as_unsigned(gpu_xxh3.block_digests(t, block))
    return out


@pytest.fixture(scope="module")
def got() -> dict[str, list[int]]:
    if CUDA:
        return kernel_digests(CASES + GPU_ONLY, "cuda")
    return _interpreted("from tests.unit.test_gpu_xxh3 import CASES, kernel_digests; "
                        "json.dump(kernel_digests(CASES, 'cpu'), sys.stdout)")


def _interpreted(code: str) -> dict[str, Any]:
    """What ``code`` (which dumps JSON to stdout) gives in a process under Triton's
    interpreter (it must be set before Triton is imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", "import json, sys; " + code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result: dict[str, Any] = json.loads(run.stdout)
    return result


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_digests_equal_xxhash(got: dict[str, list[int]], case: tuple[str, int, int | None, int]) -> None:
    name, n, fill, block = case
    assert got[name] == reference(case_bytes(n, fill), block)


@pytest.mark.parametrize("name", UNALIGNED)
def test_unaligned_data_hashes_the_same(got: dict[str, list[int]], name: str) -> None:
    assert got[name + "@1"] == got[name]


def test_real_check_blocks_fold_to_the_payload_checksum(got: dict[str, list[int]]) -> None:
    """At CHECK_BLOCK: a whole 1 MiB block and a 13-byte last one fold to segment.checksum."""
    data = case_bytes(CHECK_BLOCK + 13, None)
    assert len(got["check-block-plus-13"]) == len(check_blocks(len(data)))
    assert fold_digests(got["check-block-plus-13"]) == checksum(data)


# Digests per chunk: one (the chunk is one block: the checksum is its digest), 2 (16 B: the 9-16
# formula), 3 and 16 (17-128), 30 (240 B, the last short one), 31 and 32 (the long loop, one
# partial kiB-block), 128 (1,024 B: exactly one), 129 and 300 (scrambled kiB-blocks too).
FOLD_PER = [1, 2, 3, 16, 30, 31, 32, 128, 129, 300]


def fold_results(device: str) -> dict[str, Any]:
    """``gpu_xxh3.chunk_checksums`` of 3 chunks of random digests for each ``FOLD_PER``, the
    second chunk's expected checksum off by one bit (what the child runs on CPU)."""
    from kvstore import gpu_xxh3

    out: dict[str, Any] = {}
    for per in FOLD_PER:
        digests = [random.Random(per).getrandbits(64) for _ in range(3 * per)]
        want = [fold_digests(digests[c * per : (c + 1) * per]) for c in range(3)]
        signed = [d - (1 << 64) if d >> 63 else d for d in digests + want]
        t = torch.tensor(signed, dtype=torch.int64, device=device)
        expected = t[3 * per :].clone()
        expected[1] ^= 1
        sums, flags = gpu_xxh3.chunk_checksums(t[: 3 * per], 3, expected)
        plain, none = gpu_xxh3.chunk_checksums(t[: 3 * per], 3)
        assert flags is not None and none is None
        out[str(per)] = {"want": want, "sums": gpu_xxh3.as_unsigned(sums), "plain": gpu_xxh3.as_unsigned(plain),
                         "flags": flags.tolist()}
    return out


@pytest.fixture(scope="module")
def folds() -> dict[str, Any]:
    if CUDA:
        return fold_results("cuda")
    return _interpreted("from tests.unit.test_gpu_xxh3 import fold_results; json.dump(fold_results('cpu'), sys.stdout)")


@pytest.mark.parametrize("per", FOLD_PER)
def test_chunk_checksums_fold_and_compare_on_the_device_as_the_host_does(folds: dict[str, Any], per: int) -> None:
    """A chunk's checksum folded on the device equals ``segment.fold_digests`` of its block
    digests (so a load can compare it there, and a save seals with it), and the flag says
    whether it equals the expected one."""
    got = folds[str(per)]
    assert got["sums"] == got["want"] and got["plain"] == got["want"]
    assert got["flags"] == [1, 0, 1]


@pytest.mark.skipif(not CUDA, reason="a few MiB per case: minutes under Triton's interpreter")
@pytest.mark.parametrize("case", GPU_ONLY, ids=[c[0] for c in GPU_ONLY])
def test_multi_mib_payloads_on_the_gpu(got: dict[str, list[int]], case: tuple[str, int, int | None, int]) -> None:
    name, n, fill, block = case
    assert got[name] == reference(case_bytes(n, fill), block)


@pytest.mark.skipif(not CUDA, reason="argument checks run before any kernel; checked where the module imports natively")
def test_rejects_what_it_cannot_hash() -> None:
    from kvstore import gpu_xxh3

    with pytest.raises(ValueError):
        gpu_xxh3.block_digests(torch.zeros(4, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError):
        gpu_xxh3.block_digests(torch.zeros(0, dtype=torch.uint8, device="cuda"))
    with pytest.raises(ValueError):
        gpu_xxh3.block_digests(torch.zeros(8, dtype=torch.uint8, device="cuda"), block=1000)
