"""The save overlapped with the prefill forward, against the save after it, on one GPU: what a
prefill step's save costs beyond its forward, for Llama-3.2-1B and Llama-3.1-8B shapes.

A prefill step is run the way vLLM runs it, through the connector's own worker methods:
``bind_connector_metadata`` (the step's chunks to save), then per layer a Llama decoder layer
of the model's shape (QKV, the layer's K and V written into its paged cache, causal SDPA with
GQA, O, SwiGLU MLP; random bf16 weights, one set shared by the layers: the same work, less
memory) followed by ``save_kv_layer``, then ``wait_for_save``. Four modes, interleaved in
every round so they see the same machine:

    none       no chunk to save (the forward alone)
    whole      PDSERVE_LAYERWISE_SAVE=0: wait_for_save gathers, hashes and copies every chunk
    groups     the layer-wise save as the connector runs it: the layers go out in
               ``gpu_layerwise.FLUSHES`` (4) groups, each one gather launch and one D2H started
               on the side stream from save_kv_layer; wait_for_save hashes, waits once, seals
    layers     the same with a flush per layer (FLUSHES = the model's layers)

Columns (ms, median of ``--repeat`` rounds):

    step_ms      host time of the whole step (bind .. wait_for_save returned, GPU idle)
    overhead_ms  step_ms - the same round's ``none`` step: what saving adds to the step
    exposed_ms   from the forward's end on the GPU (the compute stream synchronised) to
                 wait_for_save's return: the save's part that the forward did not hide
    fwd_ms       the ``none`` step (the forward alone)

The store is a stand-in on a real segment (``place``: the next slots of a ring, ``finish``:
the real seals; no Redis, no agent: both modes pay those alike). Every round checks that the
two modes sealed the same checksums (same KV, same bytes).

    python3 -m bench.gpu.overlap --out bench/results/gpu-overlap.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from bench.gpu import kvpath  # noqa: F401  (stands in for vLLM's base classes where vLLM is absent)
from kvstore.client import ChunkToSave, Placement
from kvstore.connector import PDStoreConnector, StoreConnectorMetadata, _Warner
from kvstore.connector_plan import SaveItem
from kvstore.segment import HEADER_BYTES, SHM_DIR, Segment

DEVICE = "cuda"  # a CPU dry run (Triton's interpreter, CUDA stubbed) sets "cpu"
SHAPES = {  # layers, hidden, heads, kv heads, head dim, FFN
    "1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192),
    "8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336),
}


class RingStore:
    """``StoreClient.place`` / ``finish`` / ``abort`` / ``batch_put_all`` on one segment, with
    the slots taken from a ring (the agent's allocation and commit are not timed)."""

    def __init__(self, seg: Segment) -> None:
        self.seg, self.at = seg, 0
        self.sealed: list[int] = []
        self.counters: dict[str, int] = {}
        self.meta = SimpleNamespace(add_counters=self._add_counters)

    def _add_counters(self, instance: str, counters: dict[str, int], at: float) -> None:
        for k, n in counters.items():
            self.counters[k] = self.counters.get(k, 0) + n

    def place(self, chunks: Sequence[ChunkToSave], node_id: str | None = None) -> Placement:
        span = sum(HEADER_BYTES + c.nbytes for c in chunks)
        if self.at + span > self.seg.size:
            self.at = 0
        offsets = []
        for c in chunks:
            offsets.append(self.at)
            self.at += HEADER_BYTES + c.nbytes
        payloads = [self.seg.payload(o, c.nbytes) for o, c in zip(offsets, chunks, strict=True)]
        return Placement("n", None, None, list(chunks), offsets, payloads)  # type: ignore[arg-type]

    def finish(self, placed: Placement, digests: Sequence[int | None]) -> int:
        self.sealed = [self.seg.seal(o, c.key, c.nbytes, d)
                       for o, c, d in zip(placed.offsets, placed.chunks, digests, strict=True)]
        placed.closed = True
        return len(digests)

    def abort(self, placed: Placement) -> None:
        placed.closed = True

    def batch_put_all(self, chunks: Sequence[ChunkToSave], fill_all: Any, node_id: str | None = None) -> int:
        placed = self.place(chunks)
        return self.finish(placed, list(fill_all(placed.payloads)))

    def drain_counters(self) -> dict[str, int]:
        return {}


class Model:
    """A Llama decoder stack's prefill on the compute stream, with its paged KV cache laid out
    as vLLM 0.26's FlashAttention backend does (NHD memory, the permuted view handed over)."""

    def __init__(self, shape: dict[str, int], tokens: int, block: int) -> None:
        self.s, self.tokens, self.block = shape, tokens, block
        dev, dt = torch.device(DEVICE), torch.bfloat16
        h, d, kv, f = shape["hidden"], shape["head_dim"], shape["kv_heads"], shape["ffn"]
        self.num_blocks = 2 * tokens // block + 8
        self.mem = [torch.zeros(self.num_blocks, block, kv, 2 * d, device=dev, dtype=dt)
                    for _ in range(shape["layers"])]
        self.caches = {f"model.layers.{i}.self_attn.attn": m.permute(0, 2, 1, 3) for i, m in enumerate(self.mem)}
        g = torch.Generator(device=dev).manual_seed(0)

        def w(i: int, o: int) -> torch.Tensor:
            return (torch.randn(i, o, device=dev, generator=g) / i**0.5).to(dt)

        self.wqkv, self.wo = w(h, (shape["heads"] + 2 * kv) * d), w(shape["heads"] * d, h)
        self.wgu, self.wd = w(h, 2 * f), w(f, h)
        self.x0 = torch.randn(tokens, h, device=dev, generator=g).to(dt)
        # the prompt's blocks: the second half of the cache, so saving reads what this step wrote
        self.block_ids = list(range(self.num_blocks - tokens // block, self.num_blocks))
        self.slots = (torch.tensor(self.block_ids, device=dev)[:, None] * block
                      + torch.arange(block, device=dev)).reshape(-1)

    def forward(self, conn: PDStoreConnector) -> None:
        s, t = self.s, self.tokens
        heads, kv, d = s["heads"], s["kv_heads"], s["head_dim"]
        x = self.x0
        for i, name in enumerate(self.caches):
            qkv = x @ self.wqkv
            q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
            k, v = k.view(t, kv, d), v.view(t, kv, d)
            self.mem[i].view(-1, kv, 2 * d)[self.slots] = torch.cat([k, v], dim=-1)  # the KV write
            # GQA by repeating K and V: SDPA's flash kernel then runs (enable_gqa fell back to the
            # math kernel in the first run: a forward several times slower than FlashAttention's)
            rep = heads // kv
            o = torch.nn.functional.scaled_dot_product_attention(
                q.view(t, heads, d).transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
                v.repeat_interleave(rep, 1).transpose(0, 1), is_causal=True)
            x = x + o.transpose(0, 1).reshape(t, heads * d) @ self.wo
            gate, up = (x @ self.wgu).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ self.wd
            conn.save_kv_layer(name, self.caches[name], None)


def connector(model: Model, store: RingStore, chunk_blocks: int) -> PDStoreConnector:
    """The connector's worker side on a stand-in state (its constructor needs vLLM's config)."""
    c = object.__new__(PDStoreConnector)
    c._num_blocks, c._tp_size, c._tp_rank = model.num_blocks, 1, 0
    c._enabled = c._save_enabled = True
    c._load_enabled = False
    c._store = store  # type: ignore[assignment]
    c.settings = SimpleNamespace(instance="bench", gpu_tier_mb=0)  # type: ignore[assignment]
    c._warn, c._counters, c._failed_blocks, c._tier_warned = _Warner(), {}, set(), set()
    c._planner = SimpleNamespace(blocks_per_chunk=chunk_blocks)  # type: ignore[assignment]
    c._tier = c._tier_reader = None
    c._step, c._step_tried, c._connector_metadata = None, False, None
    c._parent_pid = os.getppid()
    c.register_kv_caches(model.caches)
    c._layerwise_min_bytes = 0  # every step layer by layer when asked: the benchmark compares both
    return c


def run_config(name: str, shape: dict[str, int], tokens: int, block: int, chunk_tokens: int, repeat: int,
               seg: Segment) -> dict[str, Any]:
    model = Model(shape, tokens, block)
    store = RingStore(seg)
    conn = connector(model, store, chunk_tokens // block)
    per = chunk_tokens // block
    ids = model.block_ids
    saves = [SaveItem(bytes([c % 256, c // 256]) * 8, tuple(ids[c * per : (c + 1) * per]))
             for c in range(len(ids) // per)]
    meta = StoreConnectorMetadata(saves=saves)
    layerwise_ok = conn._layerwise
    from kvstore import gpu_layerwise

    flushes = gpu_layerwise.FLUSHES

    def use(mode: str) -> None:
        conn._layerwise = mode in ("groups", "layers")
        gpu_layerwise.FLUSHES = shape["layers"] if mode == "layers" else flushes

    def step(mode: str) -> dict[str, float]:
        use(mode)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        conn.bind_connector_metadata(meta if mode != "none" else StoreConnectorMetadata())
        model.forward(conn)
        t_launched = time.perf_counter()
        torch.cuda.current_stream().synchronize()  # the forward's end on the GPU
        t_fwd = time.perf_counter()
        conn.wait_for_save()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        conn.clear_connector_metadata()
        return {"step": t1 - t0, "exposed": t1 - t_fwd, "launch": t_launched - t0}

    def plain_step(mode: str) -> float:  # no sync between the forward and wait_for_save, as in vLLM
        use(mode)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        conn.bind_connector_metadata(meta if mode != "none" else StoreConnectorMetadata())
        model.forward(conn)
        conn.wait_for_save()
        torch.cuda.synchronize()
        conn.clear_connector_metadata()
        return time.perf_counter() - t0

    modes = ["none", "whole", "groups", "layers"] if layerwise_ok else ["none", "whole"]
    for _ in range(2):  # warm up: Triton compiles, the segment is registered, cuBLAS picks kernels
        for m in modes:
            step(m)
    timed: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    plain: dict[str, list[float]] = {m: [] for m in modes}
    sums: dict[str, list[int]] = {}
    for _ in range(repeat):
        for m in modes:
            timed[m].append(step(m))
            if m != "none":
                sums[m] = store.sealed
            plain[m].append(plain_step(m))
        for m in ("groups", "layers"):
            if m in sums:
                assert sums[m] == sums["whole"], f"{m}: the layer-wise save sealed other checksums than the whole"
        assert all(isinstance(v, int) for v in sums["whole"])
    gpu_layerwise.FLUSHES = flushes
    counters = dict(store.counters)
    kv_bytes = 2 * shape["kv_heads"] * shape["head_dim"] * 2 * shape["layers"] * tokens
    row: dict[str, Any] = {"shape": name, **shape, "tokens": tokens, "block": block, "chunk_tokens": chunk_tokens,
                           "chunks": len(saves), "save_bytes": kv_bytes, "layerwise": layerwise_ok,
                           "flushes": flushes,
                           "checksums_equal": "groups" in sums and sums["groups"] == sums["layers"] == sums["whole"],
                           "counters": counters}
    fwd = [r["step"] for r in timed["none"]]
    for m in modes:
        med = statistics.median
        row[f"{m}_step_ms"] = round(med(r["step"] for r in timed[m]) * 1e3, 3)
        row[f"{m}_exposed_ms"] = round(med(r["exposed"] for r in timed[m]) * 1e3, 3)
        row[f"{m}_launch_ms"] = round(med(r["launch"] for r in timed[m]) * 1e3, 3)
        row[f"{m}_overhead_ms"] = round(med(r["step"] - f for r, f in zip(timed[m], fwd, strict=True)) * 1e3, 3)
        row[f"{m}_plain_step_ms"] = round(med(plain[m]) * 1e3, 3)
        row[f"{m}_plain_overhead_ms"] = round(
            med(p - f for p, f in zip(plain[m], plain["none"], strict=True)) * 1e3, 3)
    row["fwd_ms"] = row["none_step_ms"]
    row["pinned_d2h_ms"] = round(pinned_d2h(kv_bytes) * 1e3, 3)
    conn._gpu.close()
    return row


def pinned_d2h(nbytes: int) -> float:
    """One pinned D2H copy of the step's bytes (what the save could cost at best, not hidden)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="1b:512,1b:1024,1b:2048,1b:8192,8b:256,8b:512,8b:2048",
                    help="shape:prompt tokens of the step, comma separated")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--segment-mib", type=int, default=2048)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    free = os.statvfs(SHM_DIR)
    seg = Segment.create(f"pdkv-bench-{uuid.uuid4().hex[:8]}", min(a.segment_mib << 20,
                                                                   int(free.f_bavail * free.f_frsize * 0.5)))
    rows = []
    try:
        for cfg in a.configs.split(","):
            shape, tokens = cfg.split(":")
            row = run_config(shape, SHAPES[shape], int(tokens), a.block, a.chunk_tokens, a.repeat, seg)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    finally:
        seg.close()
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "repeat": a.repeat, "rows": rows,
              "check": "checksums equal between the modes" if all(r["checksums_equal"] for r in rows) else "MISMATCH"}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{'shape':>5} {'tokens':>6} {'MiB':>5} {'fwd':>8} {'launch':>7} | overhead / exposed: "
          f"{'whole':>13} {'groups':>13} {'layers':>13} | {'plain overhead w/g/l':>22} {'pinned':>6}  ms")
    for r in rows:
        cols = " ".join(f"{r.get(m + '_overhead_ms', '-'):>6}/{r.get(m + '_exposed_ms', '-'):<6}"
                        for m in ("whole", "groups", "layers"))
        plain = "/".join(str(r.get(m + "_plain_overhead_ms", "-")) for m in ("whole", "groups", "layers"))
        print(f"{r['shape']:>5} {r['tokens']:>6} {r['save_bytes'] >> 20:>5} {r['fwd_ms']:>8} "
              f"{r['none_launch_ms']:>7} | {'':>19} {cols} | {plain:>22} {r['pinned_d2h_ms']:>6}")


if __name__ == "__main__":
    main()
