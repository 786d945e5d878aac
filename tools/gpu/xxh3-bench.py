"""ON THE GPU MACHINE (image packages only, nothing carried): how fast kvstore/gpu_xxh3 hashes
a GPU tensor per 1 MiB checksum block, by stage, against a plain D2H copy of the same bytes.

    python3 tools/gpu/xxh3-bench.py [--out FILE.json]

Checks each size's digests against xxhash first. Times are CUDA-event medians of 20 runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kvstore import gpu_xxh3 as g  # noqa: E402
from kvstore.segment import CHECK_BLOCK  # noqa: E402


def cuda_us(fn, n: int = 20) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def measure(mib: int) -> dict[str, float]:
    n = mib * CHECK_BLOCK
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    host = data.cpu().numpy().tobytes()
    want = [xxhash.xxh3_64_intdigest(host[i : i + CHECK_BLOCK]) for i in range(0, n, CHECK_BLOCK)]
    assert g.as_unsigned(g.block_digests(data)) == want, f"{mib} MiB: digests differ from xxhash"
    secret = g._secret_on(data.device)
    n_kib = n // g.KIB_BLOCK
    sums = torch.empty(n_kib, 8, dtype=torch.int64, device="cuda")
    dig = torch.empty(mib, dtype=torch.int64, device="cuda")
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    grid = (triton.cdiv(n_kib * 16, g.ROWS),)
    stripes = cuda_us(lambda: g._stripe_sums[grid](data, secret, sums, n, BLOCK=CHECK_BLOCK, ROWS=g.ROWS))
    chains = cuda_us(lambda: g._chains[(mib,)](data, secret, sums, dig, n, BLOCK=CHECK_BLOCK, UNROLL=g.CHAIN_UNROLL,
                                                 num_warps=1))
    whole = cuda_us(lambda: g.block_digests(data))
    d2h = cuda_us(lambda: pinned.copy_(data, non_blocking=True))
    return {"mib": mib, "stripe_sums_us": round(stripes, 1), "chains_us": round(chains, 1),
            "block_digests_us": round(whole, 1), "hash_GBps": round(n / whole / 1e3, 1),
            "stripe_sums_GBps": round(n / stripes / 1e3, 1), "pinned_d2h_us": round(d2h, 1),
            "pinned_d2h_GBps": round(n / d2h / 1e3, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", default="1,4,16,64")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rows = []
    for mib in (int(s) for s in a.sizes_mib.split(",")):
        rows.append(measure(mib))
        print(json.dumps(rows[-1]), flush=True)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
              "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
