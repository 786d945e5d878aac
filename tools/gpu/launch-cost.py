# ruff: noqa: E402
"""ON THE GPU MACHINE: the host time of the KV path's kernel launches, by how they are launched.

    python3 tools/gpu/launch-cost.py [OUT.json]

Why: at 4 MiB chunks a request's save misses 0.8x of the pinned copy on some machines, and
the layer-wise save's flushes cost ~0.3 ms of host time each (docs/gpu.md): both are host
time around Triton launches (20-70 us each through ``JITFunction.run``, which binds the
arguments, specialises them and looks the kernel up on every call). This measures, for the
gather of one request (16 chunks of 4 MiB, 16 layers), the host time of:

- ``jit``: ``_copy_rows[grid](...)`` as ``GpuKVPath._launch`` does it;
- ``cached``: the same compiled kernel launched through its own launcher
  (``CompiledKernel.run``), the lookup done once; its result is checked against ``jit``'s;
- ``index_select``: the per-layer torch ops the path falls back to (one op per layer);
- ``torch_op``: one small torch op (the floor of a launch from Python);
- ``hash``: the checksum launches of the request (``GpuKVPath._hash_async``).
"""

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
import triton

from kvstore import gpu_staging
from kvstore.gpu_path import GpuKVPath

L, H, D, BS = 16, 8, 64, 16
NB = 2048
N_CHUNKS, BLOCKS = 16, 8  # 8 blocks x 16 layers x 32 KiB = 4 MiB a chunk
REPS, BATCH = 30, 20

layers = [torch.randn(NB, BS, H, 2 * D, device="cuda").to(torch.bfloat16) for _ in range(L)]
rows = [t.reshape(NB, -1) for t in layers]
path = GpuKVPath(rows)
chunk_bytes = L * BLOCKS * rows[0][0].numel() * 2
chunks = [(c, list(range(c * BLOCKS + 100, (c + 1) * BLOCKS + 100)), 0) for c in range(N_CHUNKS)]
flat = torch.zeros(N_CHUNKS * chunk_bytes, dtype=torch.uint8, device="cuda")
index = path._index(chunks, BLOCKS)
words = path.row_bytes // 8
grid = (L * index.rows, triton.cdiv(words, gpu_staging._ROW_TILE))
args = (path._table, path._strides, index.ids, index.pos, flat.view(torch.int64), index.rows, BLOCKS, words,
        index.ids, L * BLOCKS)
consts = {"TO_STAGING": True, "TILE": gpu_staging._ROW_TILE, "FLAGGED": False}


def host_us(fn) -> dict[str, float]:
    """Host microseconds per call, launches only (the GPU drained between batches)."""
    fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(REPS):
        t = time.perf_counter()
        for _ in range(BATCH):
            fn()
        per.append((time.perf_counter() - t) / BATCH * 1e6)
        torch.cuda.synchronize()
    return {"p50_us": round(statistics.median(per), 1), "min_us": round(min(per), 1), "max_us": round(max(per), 1)}


results: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "triton": triton.__version__, "chunks": N_CHUNKS, "chunk_bytes": chunk_bytes}

kernel = gpu_staging._copy_rows[grid](*args, **consts)
torch.cuda.synchronize()
want = flat.clone()
results["jit"] = host_us(lambda: gpu_staging._copy_rows[grid](*args, **consts))

stream = torch.cuda.current_stream().cuda_stream
tried = {}
for label, launch_args in (("with constexprs", (*args, *consts.values())), ("without constexprs", args)):
    flat.zero_()
    try:
        kernel.run(grid[0], grid[1], 1, stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *launch_args)
        torch.cuda.synchronize()
        same = bool(torch.equal(flat, want))
        tried[label] = "same bytes" if same else "DIFFERENT bytes"
        if same and "cached" not in results:
            results["cached"] = host_us(lambda la=launch_args: kernel.run(
                grid[0], grid[1], 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *la))
            results["cached_args"] = label
    except Exception as e:  # the launcher's signature differs between Triton versions
        tried[label] = f"{type(e).__name__}: {e}"[:300]
results["cached_tried"] = tried

ids = torch.tensor([i for _, ids_c, _ in chunks for i in ids_c], dtype=torch.long, device="cuda")
out = flat.view(torch.bfloat16).view(N_CHUNKS, L, BLOCKS, -1)
rows_flat = [r.view(NB, -1) for r in rows]


def per_layer() -> None:
    for layer, r in enumerate(rows_flat):  # one op per layer, every chunk's blocks at once
        out[:, layer].copy_(torch.index_select(r, 0, ids).view(N_CHUNKS, BLOCKS, -1))


results["index_select"] = host_us(per_layer)
small = torch.zeros(16, device="cuda")
results["torch_op"] = host_us(lambda: small.add_(1))
results["hash"] = host_us(lambda: path._hash_async(flat, N_CHUNKS))

print(json.dumps(results, indent=1))
dest = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "launch-cost.json")
with open(dest, "w") as f:
    json.dump(results, f, indent=1)
