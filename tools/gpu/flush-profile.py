# ruff: noqa: E402
"""ON THE GPU MACHINE: where a layer-wise save's host time goes (kvstore/gpu_layerwise.py).

    python3 tools/gpu/flush-profile.py [OUT.json]

A step of 16 chunks of 4 MiB (16 layers, 64 MiB) saved in ``FLUSHES`` groups, 40 times:
the host time of the set-up (``LayerwiseSave``: slots, staging, the ids' upload), of each
flush (``layer`` calls that complete a group) and of ``finish`` (hash, wait); then each part
of a flush alone, 200 times: the side stream's wait on the compute stream, the stream
context, the table slices, the gather's Triton launch, the event, the pitched D2H call.
docs/gpu.md has put a flush at ~0.3 ms of host time, "a Triton launch through Python most of
it"; this says which part it is.
"""

import contextlib
import json
import os
import statistics
import sys
import time
import uuid

import torch

sys.path.insert(0, ".")
from kvstore import gpu_layerwise, gpu_staging
from kvstore.gpu_layerwise import LayerwiseSave
from kvstore.gpu_path import GpuKVPath
from kvstore.segment import HEADER_BYTES, Segment

L, H, D, BS = 16, 8, 64, 16
NB = 2048
CHUNKS, CHUNK = 16, 4 << 20
layers = [torch.randn(NB, BS, H, 2 * D, device="cuda").to(torch.bfloat16) for _ in range(L)]
rows = [t.reshape(NB, -1) for t in layers]
path = GpuKVPath(rows)
per_block = rows[0][0].numel() * 2 * L
blocks = CHUNK // per_block
seg = Segment.create(f"pdkv-flush-{uuid.uuid4().hex[:8]}", 1 << 30)


def us(samples: list[float]) -> dict[str, float]:
    return {"p50_us": round(statistics.median(samples) * 1e6, 1), "min_us": round(min(samples) * 1e6, 1),
            "max_us": round(max(samples) * 1e6, 1)}


try:
    pays = [seg.payload(c * (CHUNK + HEADER_BYTES), CHUNK) for c in range(CHUNKS)]
    path.registry.pinned(pays[0])  # registers the whole mapping
    ids = [list(range(c * blocks, (c + 1) * blocks)) for c in range(CHUNKS)]
    want = path.extract_many(ids, pays)
    setup, flushes, finish, whole = [], [], [], []
    real_flush = LayerwiseSave._flush

    def timed_flush(self: LayerwiseSave, first: int, last: int) -> None:
        t = time.perf_counter()
        real_flush(self, first, last)
        flushes.append(time.perf_counter() - t)

    LayerwiseSave._flush = timed_flush  # type: ignore[method-assign]
    for rep in range(41):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        save = LayerwiseSave(path, ids, pays, group_bytes=256 << 20)
        t1 = time.perf_counter()
        for i in range(L):
            save.layer(i)
        t2 = time.perf_counter()
        got = save.finish()
        t3 = time.perf_counter()
        assert got == want, "the layer-wise save's checksums differ from the whole-chunk save's"
        if rep:  # the first compiles and allocates
            setup.append(t1 - t0)
            finish.append(t3 - t2)
            whole.append(t3 - t0)
    LayerwiseSave._flush = real_flush  # type: ignore[method-assign]
    out: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "chunks": CHUNKS, "chunk_bytes": CHUNK, "layers": L,
                              "flushes_per_step": gpu_layerwise.FLUSHES, "setup": us(setup),
                              "flush": us(flushes[gpu_layerwise.FLUSHES:]), "finish": us(finish), "step": us(whole)}

    # the parts of one flush (the first group), each alone
    save = LayerwiseSave(path, ids, pays, group_bytes=256 << 20)
    side, cur = path.stream, torch.cuda.current_stream(path.device)
    n, rb = blocks, path.row_bytes
    words, per = rb // 8, save.per
    grid = (per * save.index.rows, -(-words // gpu_staging._ROW_TILE))
    staging = save.flat.view(torch.int64)
    a, b, pitch = save.runs[0]
    width = per * n * rb

    def part(fn, reps: int = 200) -> dict[str, float]:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
            torch.cuda.synchronize()
        return us(times)

    def stream_context() -> None:
        with torch.cuda.stream(side):
            pass

    out["parts"] = {
        "wait_stream": part(lambda: side.wait_stream(cur)),
        "stream_context": part(stream_context),
        "current_stream": part(lambda: torch.cuda.current_stream(path.device)),
        "table_slices": part(lambda: (path._table[0:], path._strides[0:], save.flat.view(torch.int64)[0:])),
        "gather_launch": part(lambda: gpu_staging._copy_rows[grid](
            path._table, path._strides, save.index.ids, save.index.pos, staging, save.index.rows, n, words,
            save.index.ids, L * n, TO_STAGING=True, TILE=gpu_staging._ROW_TILE, FLAGGED=False)),
        "event_record": part(lambda: save.gathered.record(side)),
        "pitched_d2h_call": part(lambda: path._copy_2d(save.addrs[a], save.flat.data_ptr() + a * save.cb, width,
                                                       b - a, pitch, to_host=True, dev_pitch=save.cb)),
    }
    save.cancel()
    print(json.dumps(out, indent=1))
    dest = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "flush-profile.json")
    with open(dest, "w") as f:
        json.dump(out, f, indent=1)
finally:
    path.close()
    with contextlib.suppress(BufferError):  # a view of the mapping is still alive here; the file is gone
        seg.close()
