"""The layer-wise save (kvstore/gpu_layerwise.py) against the whole-chunk save
(``GpuKVPath.extract_many``): the same chunks into other slots of one segment must give
exactly the same bytes and the same checksums, whatever order the layers come in and however
they are grouped into flushes (the default, one per layer, two); the device
tier's hook sees staging holding the chunks; a step that cannot go layer by layer says so.

Run on CUDA by tests/gpu/test_layerwise_gpu.py (real streams, pitched copies) and on CPU by
tests/unit/test_gpu_layerwise.py (a child process: Triton's interpreter, CUDA streams as
no-ops, the pitched copy done row by row with memmove). Imports nothing GPU-only at import.
"""

from __future__ import annotations

import ctypes
import gc
import uuid
from typing import Any


def row_by_row_copy_2d(host: int, dev: int, width: int, rows: int, pitch: int, to_host: bool,
                       dev_pitch: int = 0) -> bool:
    """``GpuKVPath._copy_2d`` where device memory is host memory (the CPU run)."""
    dp = dev_pitch or width
    for r in range(rows):
        if to_host:
            ctypes.memmove(host + r * pitch, dev + r * dp, width)
        else:
            ctypes.memmove(dev + r * dp, host + r * pitch, width)
    return True


def check(device: str, layers: int = 3, per: int = 2, n_chunks: int = 4, row_elems: int = 1024) -> None:
    import torch

    from kvstore import gpu_layerwise, gpu_path
    from kvstore import segment as segmod
    from kvstore.gpu_layerwise import LayerwiseSave, LayerwiseUnavailable
    from kvstore.segment import HEADER_BYTES, Segment

    torch.manual_seed(0)
    nb = 4 * n_chunks * per
    blocks = [torch.randn(nb, row_elems, device=device).to(torch.bfloat16) for _ in range(layers)]
    path = gpu_path.GpuKVPath(blocks)
    if device == "cpu":
        path.pitched_copies = True
        path._copy_2d = row_by_row_copy_2d  # type: ignore[method-assign]
    assert path.gpu_checksums and path.fused_copies and path.pitched_copies, "the path's self-checks"
    cb = layers * per * row_elems * 2
    slot = HEADER_BYTES + cb
    seg = Segment.create(f"pdkv-test-{uuid.uuid4().hex[:8]}", 3 * n_chunks * slot)
    payloads: Any = None
    try:
        whole = [seg.payload(c * slot, cb) for c in range(n_chunks)]
        layered = [seg.payload((n_chunks + c) * slot, cb) for c in range(n_chunks)]
        ids = [tuple(range(c * per, (c + 1) * per))[::-1] for c in range(n_chunks)]
        want = path.extract_many(ids, whole)
        for order, flushes in ((range(layers), 0), (reversed(range(layers)), 0), (range(layers), layers),
                               (reversed(range(layers)), 2)):  # the default groups, one per layer, two
            for p in layered:
                p[:] = b"\0" * cb
            step = LayerwiseSave(path, ids, layered, gpu_path.GROUP_BYTES, flushes)
            seen: list[tuple[int, int]] = []
            for i in list(order):
                assert not step.complete
                step.layer(i)
            got = step.finish(lambda flat, n, chunk_bytes, seen=seen: seen.append((n, chunk_bytes)))
            assert got == want, (got, want)
            assert got == [segmod.checksum(p) for p in layered], "a checksum is not its payload's"
            for c in range(n_chunks):
                assert bytes(layered[c]) == bytes(whole[c]), f"chunk {c}: layer-wise bytes differ"
            assert seen == [(n_chunks, cb)], seen
        # the first chunks staged by a later step are not mixed up with these
        step = LayerwiseSave(path, ids[2:], layered[: n_chunks - 2], gpu_path.GROUP_BYTES)
        for i in range(layers):
            step.layer(i)
        assert step.finish() == want[2:]
        assert [bytes(p) for p in layered[: n_chunks - 2]] == [bytes(p) for p in whole[2:]]
        # a layer missing: finish refuses (the connector fills the slots the whole-chunk way)
        step = LayerwiseSave(path, ids, layered, gpu_path.GROUP_BYTES)
        step.layer(0)
        try:
            step.finish()
            raise AssertionError("finish with a layer missing")
        except LayerwiseUnavailable:
            pass
        step.cancel()
        # what cannot go layer by layer: over one staging group; slots in more runs than MAX_RUNS
        # (descending: a run each; MAX_RUNS 1 here); chunks of different lengths
        descending = [seg.payload(c * slot, cb) for c in reversed(range(n_chunks))]
        max_runs, gpu_layerwise.MAX_RUNS = gpu_layerwise.MAX_RUNS, 1
        try:
            for bad in (lambda: LayerwiseSave(path, ids, layered, cb),
                        lambda: LayerwiseSave(path, ids, descending, gpu_path.GROUP_BYTES),
                        lambda: LayerwiseSave(path, [ids[0], ids[1][:-1]], layered[:2], gpu_path.GROUP_BYTES)):
                try:
                    bad()
                    raise AssertionError("a step that cannot go layer by layer was accepted")
                except LayerwiseUnavailable:
                    pass
        finally:
            gpu_layerwise.MAX_RUNS = max_runs
        scattered = [seg.payload(c * 2 * slot, cb) for c in (0, 2, 1)]  # 3 runs: still layer by layer
        step = LayerwiseSave(path, ids[:3], scattered, gpu_path.GROUP_BYTES)
        for i in range(layers):
            step.layer(i)
        assert step.finish() == want[:3]
    finally:
        p = payloads = whole = layered = scattered = descending = step = path = bad = None  # noqa: F841  (views first)
        gc.collect()
        seg.close()
