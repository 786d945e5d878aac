"""How fast a request's chunks move between the GPU and slots of a registered host segment,
by the way the copies are issued (issue 11: the per-request KV path sits at 0.75-0.80x of one
pinned copy at 4-16 MiB chunks; this finds where the rest goes).

    python3 tools/gpu/copy-patterns.py [--request-mib 64] [--reps 30] > $OUT/copy-patterns.json

Per chunk size S (a request of --request-mib in chunks of S, slots of S + a 4 KiB header, as
the store lays them out), each direction, median seconds over --reps of:

    one       one copy of the whole request into one contiguous registered buffer (the limit)
    per_slot  one ``copy_`` per slot, queued back to back on one stream (what gpu_path does)
    two       the same copies alternated over two streams (two DMA queues)
    pitch2d   ONE cudaMemcpy2DAsync: rows of S bytes, host pitch S + header (slots adjacent)

Ratios are against ``one``. Host memory is an mmap registered with cudaHostRegister, as the
store's segment is.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import statistics
import time

import torch

HEADER = 4096  # --header: the store's slots put 64 B before each payload
D2H, H2D = 2, 1  # cudaMemcpyKind


def cudart() -> ctypes.CDLL:
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "libcudart.so" in line})
    if not libs:
        raise RuntimeError("libcudart is not mapped")
    lib = ctypes.CDLL(libs[0])
    lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                      ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return lib


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
        torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def direction(kind: int, host: torch.Tensor, gpu: torch.Tensor, slots: list[torch.Tensor],
              srcs: list[torch.Tensor], streams: tuple, rt: ctypes.CDLL, first: int, pitch: int,
              reps: int) -> dict:
    """The four ways of one direction, timed; GB/s and ratios against ``one``."""
    total, n, size = gpu.numel(), len(slots), slots[0].numel()
    s1 = streams[0]

    def one() -> None:
        with torch.cuda.stream(s1):
            if kind == D2H:
                host[:total].copy_(gpu, non_blocking=True)
            else:
                gpu.copy_(host[:total], non_blocking=True)

    def per_slot(ss: tuple = (s1,)) -> None:
        for i in range(n):
            with torch.cuda.stream(ss[i % len(ss)]):
                if kind == D2H:
                    slots[i].copy_(srcs[i], non_blocking=True)
                else:
                    srcs[i].copy_(slots[i], non_blocking=True)

    def pitch2d() -> None:
        g = gpu.data_ptr()
        dst, dp, src, sp = (first, pitch, g, size) if kind == D2H else (g, size, first, pitch)
        e = rt.cudaMemcpy2DAsync(dst, dp, src, sp, size, n, kind, s1.cuda_stream)
        if e:
            raise RuntimeError(f"cudaMemcpy2DAsync: {e}")

    t_one = timed(one, reps)
    t_slot = timed(per_slot, reps)
    t_two = timed(lambda: per_slot(streams), reps)
    t_2d = timed(pitch2d, reps)

    def gbps(t: float) -> float:
        return round(total / t / 1e9, 2)

    return {"one_GBps": gbps(t_one), "per_slot_GBps": gbps(t_slot), "two_GBps": gbps(t_two),
            "pitch2d_GBps": gbps(t_2d), "per_slot_vs_one": round(t_one / t_slot, 3),
            "two_vs_one": round(t_one / t_two, 3), "pitch2d_vs_one": round(t_one / t_2d, 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--request-mib", type=int, default=64)
    p.add_argument("--sizes-mib", default="1,4,16,64")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--header", type=int, default=HEADER, help="bytes before each slot's payload")
    args = p.parse_args()
    header = args.header
    dev = torch.device("cuda", 0)
    total = args.request_mib << 20
    torch.zeros(1, device=dev)
    rt = cudart()
    span = total + (total // (1 << 20) + 1) * header + (1 << 20)
    mm = mmap.mmap(-1, span, flags=mmap.MAP_SHARED)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    err = torch.cuda.cudart().cudaHostRegister(base, span, 0)
    host = torch.frombuffer(mm, dtype=torch.uint8)
    gpu = torch.randint(0, 255, (total,), dtype=torch.uint8, device=dev)
    s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    rows: list[dict] = []
    for mib in [int(x) for x in args.sizes_mib.split(",")]:
        size = mib << 20
        n = total // size
        pitch = size + header
        slots = [host[header + i * pitch: header + i * pitch + size] for i in range(n)]
        srcs = [gpu[i * size:(i + 1) * size] for i in range(n)]
        row: dict = {"chunk_mib": mib, "chunks": n, "register_err": int(err)}
        for name, kind in (("d2h", D2H), ("h2d", H2D)):
            row[name] = direction(kind, host, gpu, slots, srcs, (s1, s2), rt, base + header, pitch, args.reps)
        # pitch2d moved the right bytes: compare one slot with its source
        torch.cuda.synchronize()
        row["pitch2d_equal"] = bool(torch.equal(slots[-1].to(dev), srcs[-1]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(dev), "request_mib": args.request_mib, "header": header,
                      "rows": rows}))


if __name__ == "__main__":
    main()
