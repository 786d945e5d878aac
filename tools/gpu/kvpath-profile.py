# ruff: noqa: B023, E402
"""ON THE GPU MACHINE: where kvstore.gpu_path's time goes, stage by stage (us per chunk).

    python3 tools/gpu/kvpath-profile.py
"""

import contextlib
import sys
import time
import uuid

import torch

sys.path.insert(0, ".")
from kvstore import gpu_xxh3
from kvstore import segment as segmod
from kvstore.gpu_path import GpuKVPath
from kvstore.segment import Segment, check_blocks

L, H, D, BS = 16, 8, 64, 16
nb = 2048
layers = [torch.randn(nb, BS, H, 2 * D, device="cuda").to(torch.bfloat16) for _ in range(L)]
rows = [t.reshape(nb, -1) for t in layers]
per_block = rows[0][0].numel() * 2 * L
path = GpuKVPath(rows)
seg = Segment.create(f"pdkv-prof-{uuid.uuid4().hex[:8]}", 1 << 30)
key = b"k" * 16


def t_us(fn, it=20):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(it):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t) / it * 1e6, 1)


def hash_to_host(flat):
    """A chunk's checksum, hashed and folded on the GPU, read by the host."""
    sums, _ = path._hash_async(flat, 1)
    path.hash_stream.synchronize()
    return sums.tolist()


def trace(path, label, fn, steps=("_slots", "_index", "_launch", "_move", "_hash_async", "_to_host", "_scatter",
                                    "_copy_in", "_extract_group", "_verify_and_scatter")):
    """Print one call's timeline (us from its start): the path's own steps (as marked),
    CUDA runtime calls over 3 us, and every GPU kernel and copy."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def marked(name, f):
        def run(*a, **k):
            with record_function(name):
                return f(*a, **k)
        return run

    saved = {name: getattr(path, name) for name in steps if hasattr(path, name)}
    for name, f in saved.items():
        setattr(path, name, marked(name, f))
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(4):
                with record_function(f"call{i}"):
                    fn()
                torch.cuda.synchronize()
    finally:
        for name in saved:
            delattr(path, name)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    call = [e for e in events if e.name == "call3"][0]
    t0, t1 = call.time_range.start, call.time_range.end
    print(f"TRACE {label}: {t1 - t0:.0f} us on the host")
    lines = 0
    for e in events:
        start, dur = e.time_range.start - t0, e.time_range.elapsed_us()
        if start < -5 or e.time_range.start > t1 + 300 or e.name.startswith("call"):
            continue
        gpu = str(e.device_type).endswith("CUDA")
        if not gpu and not e.name.startswith("_") and not (e.name.startswith("cu") and dur > 3):
            continue
        print(f"TRACE {start:8.1f} {dur:8.1f} {'GPU' if gpu else 'cpu'} {e.name[:70]}")
        lines += 1
        if lines > 90:
            break


try:
    for kib in (1024, 4096, 65536):
        n = kib * 1024
        blocks = n // per_block
        ids = list(range(blocks))
        payload = seg.payload(0, n)
        path.registry.pinned(payload)
        host = torch.frombuffer(payload, dtype=torch.uint8)
        pin = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        flat = path._stage(n)
        view = flat.view(torch.bfloat16).view(L, blocks, -1)
        idt = torch.tensor(ids, device="cuda")
        mvs = [payload[a:b] for a, b in check_blocks(n)]
        digest = seg.seal(0, key, n, path.extract(ids, payload))
        r = {
            "ids_to_dev": t_us(lambda: torch.tensor(ids, dtype=torch.long).to("cuda", non_blocking=True)),
            "gather16": t_us(lambda: [torch.index_select(rw, 0, idt, out=view[i]) for i, rw in enumerate(rows)]),
            "gather_fused": t_us(lambda: path._launch([(0, ids, 0)], flat, blocks, to_staging=True)),
            "scatter_fused": t_us(lambda: path._launch([(0, ids, 0)], flat, blocks, to_staging=False)),
            "d2h_seg": t_us(lambda: host.copy_(flat, non_blocking=True)),
            "d2h_pin": t_us(lambda: pin.copy_(flat, non_blocking=True)),
            "h2d_seg": t_us(lambda: flat.copy_(host, non_blocking=True)),
            "hash_gpu": t_us(lambda: gpu_xxh3.block_digests(flat)),
            "hash_gpu_to_host": t_us(lambda: hash_to_host(flat)),
            "hash_1thr_cpu": t_us(lambda: [segmod.block_digest(m) for m in mvs]),
            "scatter16": t_us(lambda: [rw.index_copy_(0, idt, view[i]) for i, rw in enumerate(rows)]),
            "extract": t_us(lambda: path.extract(ids, payload)),
            "extract+seal": t_us(lambda: seg.seal(0, key, n, path.extract(ids, payload))),
            "load_checked": t_us(lambda: path.load_checked(payload, digest, ids, blocks, 0)),
            "inject (host-verified path, no verify)": t_us(lambda: path.inject(payload, ids, blocks, 0)),
        }
        print(f"PROF {kib} KiB", r, flush=True)
    for kib, count in ((1024, 64), (4096, 16), (65536, 2)):  # a request's chunks in one call
        n = kib * 1024
        blocks = n // per_block
        ids = [list(range(c * blocks, (c + 1) * blocks)) for c in range(count)]
        pays = [seg.payload(c * (n + segmod.HEADER_BYTES), n) for c in range(count)]
        digs = path.extract_many(ids, pays)
        tg = [(i, 0) for i in ids]
        r = {"extract_many": t_us(lambda: path.extract_many(ids, pays)),
             "load_many": t_us(lambda: path.load_many(pays, digs, tg, blocks))}
        print(f"PROF request {count} x {kib} KiB (us per request)", r, flush=True)
    print("is_pinned", host.is_pinned(), "fused_copies", path.fused_copies, "gpu_checksums", path.gpu_checksums)
    n = 4 << 20  # one request's timeline: 16 x 4 MiB, host and GPU (torch.profiler)
    blocks = n // per_block
    ids = [list(range(c * blocks, (c + 1) * blocks)) for c in range(16)]
    pays = [seg.payload(c * (n + segmod.HEADER_BYTES), n) for c in range(16)]
    digs = path.extract_many(ids, pays)
    tg = [(i, 0) for i in ids]
    trace(path, "extract_many 16 x 4 MiB", lambda: path.extract_many(ids, pays))
    trace(path, "load_many 16 x 4 MiB", lambda: path.load_many(pays, digs, tg, blocks))
    if hasattr(path, "device_verdicts"):
        path.device_verdicts = False
        trace(path, "load_many 16 x 4 MiB, verdicts read by the host", lambda: path.load_many(pays, digs, tg, blocks))
        path.device_verdicts = True
finally:
    path.close()
    with contextlib.suppress(BufferError):  # a view of the mapping is still alive here; the file is gone
        seg.close()
