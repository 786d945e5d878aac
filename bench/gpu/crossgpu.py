"""KV moved from a prefill GPU to a decode GPU, through the store and against the direct
paths, side by side in one run (issue 12, item 2).

    python3 -m bench.gpu.crossgpu --out $OUT/gpu-crossgpu.json     (tools/gpu/run-tests.sh, CROSS=1)

Two processes, as in serving: a "prefill" process on GPU ``--src`` and a "decode" process on
GPU ``--dst`` (default: GPU 0 and the last GPU; on a one-GPU machine both on GPU 0, which
still crosses processes but not devices). Each holds a paged KV cache shaped as
``bench.gpu.kvpath``'s (vLLM 0.26's FlashAttention layout, Llama-3.2-1B by default). One
request of ``--request-mib`` is moved per timed pass, as chunks of each size:

    store     prefill: the connector's save (kvstore.gpu_path.extract_many: one gather, GPU
              xxh3, D2H into the node's segment) + seal; decode: its load (load_many: H2D,
              GPU xxh3, compare, scatter). Time = the prefill's save + the decode's load.
    pinned    the same bytes as one contiguous buffer: D2H into pinned host memory on the
              prefill side, H2D on the decode side (the host round trip's physical limit)
    d2d       ``torch`` copy of the same bytes from GPU src to GPU dst in one process (peer
              copy over NVLink / PCIe between two GPUs; on one GPU a device-local copy)
    ipc       the decode process opens the prefill process's GPU buffer (CUDA IPC, through
              torch.multiprocessing) and copies it to its own GPU: what a direct GPU-to-GPU
              transport would do, with no checksum
    tier      the device tier (kvstore/transport/cuda_ipc.py), as the connector runs it:
              prefill: the store's save with each staging group also copied into the tier's
              slots (GpuKVPath.extract_many_staged + DeviceTier.stage) + seals + the mappings
              (DeviceTier.publish, one Redis pipeline); decode: TierReader.sources (one MGET)
              + GpuKVPath.load_from_device (D2D pull through CUDA IPC, GPU xxh3, compare,
              scatter). Time = that save + that load. Needs a redis-server on PATH (else the
              rows have no tier columns); ``--no-tier`` skips it.

Every figure is GB/s of KV moved; ratios: store / pinned, store / d2d, ipc / store, and
tier / store (``tier_vs_store``: the whole path with the tier against the store path alone;
the tier's save still writes the host copy, so its gain is the load's). The store and tier
paths' bytes are checked on the decode GPU (every chunk's GPU digest equals the prefill's);
the ipc copy is compared with the source once per size.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp

KIB = 1024


def parse_args() -> argparse.Namespace:
    from bench.gpu.kvpath import add_cache_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cache_args(ap)
    ap.add_argument("--sizes-kib", default="1024,4096,16384,65536", help="chunk sizes (whole blocks)")
    ap.add_argument("--request-mib", type=int, default=64, help="KV bytes moved per timed pass")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--src", type=int, default=0, help="the prefill process's GPU")
    ap.add_argument("--dst", type=int, default=-1, help="the decode process's GPU (-1: the last one)")
    ap.add_argument("--out", default="")
    ap.add_argument("--no-tier", action="store_true", help="skip the device tier rows")
    return ap.parse_args()


def _sync(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def _worker(a: argparse.Namespace, device_index: int, seg_name: str, conn: Connection, peer: Connection,
            redis_url: str | None) -> None:
    """One side: builds its cache and the connector's GPU path, then serves the main
    process's commands (``conn``); ``peer`` reaches the other side (the CUDA IPC handle);
    ``redis_url`` the device tier's metadata (None: no tier)."""
    from bench.gpu.kvpath import Cache
    from kvstore.segment import HEADER_BYTES, Segment

    torch.cuda.set_device(device_index)
    a.device = f"cuda:{device_index}"
    a.legacy = False
    dev = torch.device(a.device)
    seg = Segment.attach(seg_name)
    cache = Cache(a, a.block_size)
    gpu = cache.conn._gpu
    assert gpu is not None and gpu.gpu_checksums, "the GPU KV path (GPU checksums) did not come up"
    state: dict[str, Any] = {}
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            if cmd == "setup":  # arg: chunk bytes, blocks per chunk, chunks
                nbytes, blocks, n = arg
                cache.set_chunk_blocks(blocks)
                slot = HEADER_BYTES + nbytes
                state.update(nbytes=nbytes, blocks=blocks, n=n, slot=slot,
                             ids=[tuple(range(c * blocks, (c + 1) * blocks)) for c in range(n)],
                             payloads=[seg.payload(c * slot, nbytes) for c in range(n)],
                             flat=torch.randint(0, 255, (n * nbytes,), dtype=torch.uint8, device=dev),
                             pinned=seg.payload(n * slot, n * nbytes))  # a region of the same pinned segment
                conn.send(("ok", None))
            elif cmd == "save":  # the store path's prefill side: returns (seconds, digests)
                _sync(dev)
                t = time.perf_counter()
                digests = cache.extract_all(state["ids"], state["payloads"])
                for c, d in enumerate(digests):
                    seg.seal(c * state["slot"], b"k" * 16, state["nbytes"], d)
                _sync(dev)
                conn.send((time.perf_counter() - t, digests))
            elif cmd == "load":  # the decode side: arg = digests; returns (seconds, all matched)
                _sync(dev)
                t = time.perf_counter()
                ok = gpu.load_many(state["payloads"], arg, [(ids, 0) for ids in state["ids"]], state["blocks"])
                _sync(dev)
                conn.send((time.perf_counter() - t, all(ok)))
            elif cmd in ("d2h", "h2d"):  # the pinned host round trip, one contiguous buffer
                conn.send((_pinned_copy(cmd == "d2h", state["flat"], state["pinned"], dev), None))
            elif cmd == "export":  # prefill: its buffer to the decode side (a CUDA IPC handle)
                peer.send(state["flat"])
                conn.send((0.0, None))
            elif cmd == "open":  # decode: the prefill side's buffer, mapped here
                state["remote"] = peer.recv()
                conn.send((0.0, None))
            elif cmd == "pull":  # decode: copy the mapped buffer onto this GPU
                _sync(dev)
                t = time.perf_counter()
                state["flat"].copy_(state["remote"], non_blocking=True)
                _sync(dev)
                conn.send((time.perf_counter() - t, None))
            elif cmd == "close":  # decode: whether the pulled copy equals its source; unmap it
                same = bool(torch.equal(state["flat"], state["remote"].to(dev)))
                del state["remote"]
                conn.send((0.0, same))
            elif cmd.startswith("tier_"):
                conn.send(_tier_command(cmd, arg, state, gpu, seg, dev, redis_url))
    finally:
        if "tier" in state:
            try:
                state["tier"].close()
            except Exception as e:  # Redis gone first: its keys went with it
                print(f"device tier close: {e}")
        state.clear()  # the payload views and tensors over the segment go before its mapping
        del cache
        gc.collect()
        gpu.close()
        with contextlib.suppress(BufferError):  # a view still exported: the mapping goes with the process
            seg.close()


def _tier_command(cmd: str, arg: Any, state: dict[str, Any], gpu: Any, seg: Any, dev: torch.device,
                  redis_url: str | None) -> tuple[float, Any]:
    """The device tier's side of one step, as ``PDStoreConnector._extract_to_tier`` and
    ``_load_from_tier`` run it (without their error handling): returns (seconds, result)."""
    from kvstore.metadata import ChunkLocation, MetadataStore, connect
    from kvstore.transport.cuda_ipc import DeviceTier, TierReader, ipc_opener

    assert redis_url is not None
    if "meta" not in state:  # one client per process: no connection set up inside a timed call
        state["meta"] = MetadataStore(connect(redis_url), "xgpu")
    meta = state["meta"]
    if cmd == "tier_setup":  # prefill: a tier of one request's chunks at this size (the old one withdrawn)
        if "tier" in state:
            state.pop("tier").close()
        state["tier"] = DeviceTier.allocate(meta, "node", dev, state["nbytes"], state["n"] * state["nbytes"])
        return 0.0, None
    keys = [f"chunk-{c}".encode().ljust(16, b"_") for c in range(state["n"])]
    if cmd == "tier_save":  # prefill: returns (seconds, (digests, seconds of the Redis publish))
        tier = state["tier"]
        _sync(dev)
        t = time.perf_counter()
        digests = gpu.extract_many_staged(state["ids"], state["payloads"], tier.stage)
        for c, d in enumerate(digests):
            seg.seal(c * state["slot"], b"k" * 16, state["nbytes"], d)
        t_pub = time.perf_counter()
        tier.publish(keys, digests)
        _sync(dev)
        done = time.perf_counter()
        return done - t, (digests, done - t_pub)
    # "tier_load", decode: arg = digests; returns (seconds, (every chunk pulled and matched,
    # seconds of the Redis lookup))
    reader = state.get("reader") or state.setdefault("reader", TierReader(meta, "node", ipc_opener(dev)))
    locs = [ChunkLocation("node", "seg", 0, state["nbytes"], d) for d in arg]
    _sync(dev)
    t = time.perf_counter()
    found = reader.sources(keys, locs, state["nbytes"])
    t_pull = time.perf_counter()
    ok = gpu.load_from_device(found.srcs, [arg[i] for i in found.idx], [(state["ids"][i], 0) for i in found.idx],
                              state["blocks"])
    _sync(dev)
    return time.perf_counter() - t, (len(found.idx) == len(keys) and all(ok), t_pull - t)


def _pinned_copy(to_host: bool, flat: torch.Tensor, pinned: memoryview, dev: torch.device) -> float:
    """Seconds of one plain copy between ``flat`` and the pinned host region ``pinned``."""
    host = torch.frombuffer(pinned, dtype=torch.uint8)
    _sync(dev)
    t = time.perf_counter()
    if to_host:
        host.copy_(flat, non_blocking=True)
    else:
        flat.copy_(host, non_blocking=True)
    _sync(dev)
    return time.perf_counter() - t


def _call(conn: Connection, cmd: str, arg: Any = None) -> Any:
    conn.send((cmd, arg))
    return conn.recv()


def _redis(a: argparse.Namespace) -> tuple[Any, str | None]:
    """A private redis-server for the device tier's metadata; (None, None) without one."""
    if a.no_tier:
        return None, None
    import tempfile
    from pathlib import Path

    from cluster.runtime import start_redis_child

    try:
        proc, url, _port = start_redis_child(Path(tempfile.mkdtemp(prefix="xgpu-redis-")))
    except Exception as e:  # not installed, or it does not come up: the other paths still run
        print(f"no device tier rows: redis-server does not start here ({type(e).__name__}: {e})")
        return None, None
    return proc, url


def main() -> None:
    a = parse_args()
    from kvstore.segment import HEADER_BYTES, SHM_DIR, Segment

    n_gpus = torch.cuda.device_count()
    if n_gpus == 0:
        raise SystemExit("no CUDA device: this benchmark runs on the GPU machine")
    src = a.src
    dst = n_gpus - 1 if a.dst < 0 else a.dst
    per_block = 2 * a.block_size * a.kv_heads * a.head_dim * getattr(torch, a.dtype).itemsize * a.layers
    request = a.request_mib << 20
    free = os.statvfs(SHM_DIR)
    seg_bytes = 2 * request + (256 << 20)
    if seg_bytes > free.f_bavail * free.f_frsize * 0.8:
        raise SystemExit(f"/dev/shm lacks {seg_bytes >> 20} MiB for the segment")
    seg = Segment.create(f"pdkv-xgpu-{uuid.uuid4().hex[:8]}", seg_bytes)
    redis_proc, redis_url = _redis(a)
    ctx = mp.get_context("spawn")
    ends = {}
    procs: list[Any] = []
    peers = dict(zip(("prefill", "decode"), ctx.Pipe(), strict=True))
    for role, dev in (("prefill", src), ("decode", dst)):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(a, dev, seg.name, theirs, peers[role], redis_url), name=f"xgpu-{role}")
        p.start()
        ends[role], procs = mine, [*procs, p]
    d2d_src = torch.empty(request, dtype=torch.uint8, device=f"cuda:{src}").random_(0, 255)
    d2d_dst = torch.empty(request, dtype=torch.uint8, device=f"cuda:{dst}")
    rows = []
    try:
        for kib in (int(s) for s in a.sizes_kib.split(",")):
            nbytes = kib * KIB
            if nbytes % per_block:
                print(f"skip {kib} KiB: not whole blocks of {per_block} B")
                continue
            n = max(1, request // nbytes)
            total = n * nbytes
            if 2 * n * (HEADER_BYTES + nbytes) > seg_bytes:
                print(f"skip {kib} KiB: over the segment")
                continue
            for side in ends.values():
                assert _call(side, "setup", (nbytes, nbytes // per_block, n))[0] == "ok"
            paths = ["store", "store_save", "store_load", "pinned", "d2d", "ipc"]
            if redis_url:
                paths += ["tier", "tier_save", "tier_load"]
                _call(ends["prefill"], "tier_setup")
            times: dict[str, list[float]] = {k: [] for k in paths}
            redis_s: dict[str, list[float]] = {"publish": [], "lookup": []}  # the tier's Redis calls
            ends["prefill"].send(("export", None))
            _call(ends["decode"], "open")
            ends["prefill"].recv()
            for turn in range(a.repeat + 1):  # turn 0 warms every path up, untimed
                ts, digests = _call(ends["prefill"], "save")
                tl, ok = _call(ends["decode"], "load", digests)
                assert ok, f"{kib} KiB: the decode GPU's copy did not match what the prefill GPU saved"
                td2h = _call(ends["prefill"], "d2h")[0]
                th2d = _call(ends["decode"], "h2d")[0]
                torch.cuda.synchronize()
                t = time.perf_counter()
                d2d_dst[:total].copy_(d2d_src[:total], non_blocking=True)
                torch.cuda.synchronize()
                td2d = time.perf_counter() - t
                tipc = _call(ends["decode"], "pull")[0]
                if turn:
                    for k, v in (("store", ts + tl), ("store_save", ts), ("store_load", tl),
                                 ("pinned", td2h + th2d), ("d2d", td2d), ("ipc", tipc)):
                        times[k].append(v)
                if redis_url:
                    tts, (digests, tpub) = _call(ends["prefill"], "tier_save")
                    ttl, (ok, tlook) = _call(ends["decode"], "tier_load", digests)
                    assert ok, f"{kib} KiB: a chunk did not come from the device tier, or did not verify"
                    if turn:
                        for k, v in (("tier", tts + ttl), ("tier_save", tts), ("tier_load", ttl)):
                            times[k].append(v)
                        redis_s["publish"].append(tpub)
                        redis_s["lookup"].append(tlook)
            assert _call(ends["decode"], "close")[1], "the ipc copy differs from its source"
            row: dict[str, Any] = {"chunk_bytes": nbytes, "chunks": n, "request_bytes": total}
            for k, v in times.items():
                row[f"{k}_GBps"] = round(total / statistics.median(v) / 1e9, 2)
            row["store_vs_pinned"] = round(row["store_GBps"] / row["pinned_GBps"], 3)
            row["store_vs_d2d"] = round(row["store_GBps"] / row["d2d_GBps"], 3)
            row["ipc_vs_store"] = round(row["ipc_GBps"] / row["store_GBps"], 2)
            if redis_url:
                row["tier_vs_store"] = round(row["tier_GBps"] / row["store_GBps"], 2)
                row["tier_load_vs_store_load"] = round(row["tier_load_GBps"] / row["store_load_GBps"], 2)
                row["tier_publish_us"] = round(statistics.median(redis_s["publish"]) * 1e6)
                row["tier_lookup_us"] = round(statistics.median(redis_s["lookup"]) * 1e6)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for side in ends.values():
            try:
                side.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        seg.close()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
    result = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(n_gpus)], "src": src, "dst": dst,
        "same_gpu": src == dst, "torch": torch.__version__,
        "model_shape": {"layers": a.layers, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "dtype": a.dtype,
                        "block_size": a.block_size},
        "request_mib": a.request_mib, "repeat": a.repeat, "tier": redis_url is not None, "rows": rows,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"GPU {src} -> GPU {dst}{' (one GPU: no device is crossed)' if src == dst else ''}, GB/s")
    print(f"{'chunk':>9} {'store':>7} {'save':>7} {'load':>7} {'pinned':>7} {'d2d':>7} {'ipc':>7} "
          f"{'st/pin':>7} {'st/d2d':>7} {'ipc/st':>7}")
    for r in rows:
        print(f"{r['chunk_bytes'] // KIB:>7}Ki {r['store_GBps']:>7} {r['store_save_GBps']:>7} "
              f"{r['store_load_GBps']:>7} {r['pinned_GBps']:>7} {r['d2d_GBps']:>7} {r['ipc_GBps']:>7} "
              f"{r['store_vs_pinned']:>7} {r['store_vs_d2d']:>7} {r['ipc_vs_store']:>7}")
    if redis_url:
        print(f"device tier, GB/s (publish / lookup: its Redis calls, us)\n{'chunk':>9} {'tier':>7} {'save':>7} "
              f"{'load':>7} {'tier/st':>7} {'load/st':>7} {'publish':>7} {'lookup':>7}")
        for r in rows:
            print(f"{r['chunk_bytes'] // KIB:>7}Ki {r['tier_GBps']:>7} {r['tier_save_GBps']:>7} "
                  f"{r['tier_load_GBps']:>7} {r['tier_vs_store']:>7} {r['tier_load_vs_store_load']:>7} "
                  f"{r['tier_publish_us']:>7} {r['tier_lookup_us']:>7}")


if __name__ == "__main__":
    main()
