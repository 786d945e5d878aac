# ruff: noqa: B023
"""ON THE GPU MACHINE, with only the image's packages (no vLLM): kvstore.gpu_path against a
store segment, before the parts are all there. Round trip bit for bit, the sealed digest is the
payload's, and rough GB/s of extract+seal and verify+inject against pinned copies.

    python3 tools/gpu/kvpath-smoke.py
"""

import contextlib
import statistics
import sys
import time
import uuid

import torch

sys.path.insert(0, ".")
from kvstore import segment as segmod  # noqa: E402
from kvstore.gpu_path import REGISTRY, GpuKVPath  # noqa: E402
from kvstore.segment import HEADER_BYTES, Segment  # noqa: E402

L, H, D, BS = 16, 8, 64, 16
nb = 2048
layers = [torch.randn(nb, BS, H, 2 * D, device="cuda").to(torch.bfloat16).permute(0, 2, 1, 3) for _ in range(L)]
rows = [t.permute(0, 2, 1, 3).reshape(nb, -1) for t in layers]  # memory order, as _block_rows
per_block = rows[0][0].numel() * 2 * L
path = GpuKVPath(rows)
print("SMOKE gpu_checksums", path.gpu_checksums, "fused_copies", path.fused_copies, flush=True)
assert path.gpu_checksums, "the GPU xxh3 failed its self-check"
seg = Segment.create(f"pdkv-smoke-{uuid.uuid4().hex[:8]}", 1 << 30)
key = b"k" * 16
try:
    for kib in (1024, 4096, 16384, 65536):
        n = kib * 1024
        blocks = n // per_block
        ids = list(range(blocks))
        dst = list(range(blocks, 2 * blocks))
        slot_n = max(1, min(8, seg.size // (HEADER_BYTES + n)))
        offs = [j * (HEADER_BYTES + n) for j in range(slot_n)]
        digests = [0] * slot_n

        def save(j):
            digests[j] = seg.seal(offs[j], key, n, path.extract(ids, seg.payload(offs[j], n)))

        def load(j):
            assert path.load_checked(seg.payload(offs[j], n), digests[j], dst, blocks, 0)

        for j in range(slot_n):
            save(j)
        assert digests[0] == segmod.checksum(seg.payload(offs[0], n))
        load(0)
        torch.cuda.synchronize()
        for r in rows:
            assert torch.equal(r[ids], r[dst])
        damaged = seg.payload(offs[0], n)
        damaged[n - 1] ^= 1  # one bit: the GPU check fails and nothing is scattered
        other = list(range(2 * blocks, 3 * blocks))
        before = [r[other].clone() for r in rows]
        assert not path.load_checked(damaged, digests[0], other, blocks, 0)
        torch.cuda.synchronize()
        assert all(torch.equal(r[other], b) for r, b in zip(rows, before, strict=True))
        damaged[n - 1] ^= 1
        g = torch.empty(n, dtype=torch.uint8, device="cuda")
        p = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        res = {}
        for name, fn in (("save", save), ("load", load),
                         ("pin_d2h", lambda j: p.copy_(g, non_blocking=True)),
                         ("pin_h2d", lambda j: g.copy_(p, non_blocking=True))):
            it = max(4, min(32, (256 << 20) // n))
            ts = []
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                for i in range(it):
                    fn(i % slot_n)
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t) / it)
            res[name] = round(n / statistics.median(ts) / 1e9, 2)
        print(f"SMOKE {kib} KiB pinned={REGISTRY.pinned(seg.payload(0, n))} {res} "
              f"save/pin={res['save'] / res['pin_d2h']:.2f} load/pin={res['load'] / res['pin_h2d']:.2f}", flush=True)
finally:
    path.close()
    with contextlib.suppress(BufferError):  # torch.frombuffer views of the mapping are alive; the file is gone
        seg.close()
print("SMOKE OK")
