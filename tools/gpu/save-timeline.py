# ruff: noqa: E402
"""ON THE GPU MACHINE: a request's save, round by round, and what sets its spread.

    python3 tools/gpu/save-timeline.py [--rounds 300] [--out OUT.json]

Why: ``bench/gpu/kvpath.py``'s per-request save (16 chunks of 4 MiB) measured 36-46 GB/s
across calls (0.66-0.84x) while the pinned copy it is held against measured 54.4-55.1 GB/s
in every one of them: the spread is the save's, not the limit's. This says which stage of the
save moves.

One request of 16 chunks of 4 MiB (the 1B shape: 16 layers, 8 KV heads, head_dim 64, bf16,
block 16), its slots back to back in a registered 1 GiB segment, as the benchmark's request
rows. Each round runs these cases in a shuffled order, the GPU idle before each:

    pinned     one torch copy of the 64 MiB into pinned memory (the limit)
    seg        one cudaMemcpyAsync of the 64 MiB into the registered segment (contiguous)
    seg_huge   the same into a second segment advised MADV_HUGEPAGE before it was registered
    pitched    the save's pitched D2H of the 16 slots alone, from staging
    save       GpuKVPath.extract_many + the 16 seals, as the benchmark times it
    save_jit   the same with the gather launched through ``JITFunction.run`` inside
               ``torch.cuda.stream`` (``CopyRows.direct`` off), as before 2026-12-04 evening
    traced     the same with CUDA events and host clocks at its stages:
                 prep      call -> the D2H queued (host)
                 ready     call -> the gather done (GPU; the host's prep as the GPU sees it)
                 d2h       the D2H on the GPU
                 tail      the D2H done -> the seals done (the hash's wait, the readback, seals)

Then each step of the save's host work before its D2H is queued, alone, ``--parts`` times (the
GPU drained between calls; host time only): what the ~200 us of ``prep`` are made of.

The rounds run twice: the main thread free to move, then pinned to one core. Printed: each
case's p10 / p50 / p90 (us), the save's ratio to the pinned copy per round, and how much of
the save's spread each stage of ``traced`` carries (p90 - p10 of each). Also the machine: CPU
model, NUMA nodes and the GPU's, transparent huge pages, what the kernel placed where.
"""

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import random
import statistics
import sys
import time
import uuid

import torch

sys.path.insert(0, ".")
from kvstore import gpu_path
from kvstore.gpu_host import _memcpy_2d_async
from kvstore.gpu_path import GpuKVPath
from kvstore.segment import HEADER_BYTES, Segment

L, H, D, BS = 16, 8, 64, 16
NB = 2048
CHUNKS, CHUNK = 16, 4 << 20
TOTAL = CHUNKS * CHUNK
D2H = 2


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return f"({e.strerror})"


def machine() -> dict:
    cpu = [line.split(":", 1)[1].strip() for line in read("/proc/cpuinfo").splitlines()
           if line.startswith("model name")]
    nodes = sorted(os.listdir("/sys/devices/system/node")) if os.path.isdir("/sys/devices/system/node") else []
    gpu_node = ""
    for dev in os.listdir("/sys/bus/pci/devices") if os.path.isdir("/sys/bus/pci/devices") else []:
        where = f"/sys/bus/pci/devices/{dev}"
        if read(f"{where}/vendor") == "0x10de" and read(f"{where}/class").startswith("0x03"):
            gpu_node += f"{dev}: node {read(f'/sys/bus/pci/devices/{dev}/numa_node')}, link " \
                        f"{read(f'/sys/bus/pci/devices/{dev}/current_link_speed')} x" \
                        f"{read(f'/sys/bus/pci/devices/{dev}/current_link_width')}; "
    meminfo = {k: v.strip() for k, v in (line.split(":", 1) for line in read("/proc/meminfo").splitlines())
               if k in ("MemTotal", "MemFree", "Shmem", "ShmemHugePages", "AnonHugePages", "HugePages_Total")}
    return {
        "cpu": cpu[0] if cpu else "", "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
        "numa_nodes": [n for n in nodes if n.startswith("node")], "gpu": gpu_node,
        "thp": read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_shmem": read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "scaling_governor": read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "kernel": os.uname().release, "meminfo": meminfo,
    }


def numa_maps(addr: int) -> str:
    """The /proc/self/numa_maps line of the mapping at ``addr`` (where its pages lie)."""
    for line in read("/proc/self/numa_maps").splitlines():
        if int(line.split()[0], 16) == addr:
            return line
    return ""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(xs: list[float], digits: int = 1) -> dict:
    return {"p10": round(pct(xs, 0.1), digits), "p50": round(statistics.median(xs), digits),
            "p90": round(pct(xs, 0.9), digits), "min": round(min(xs), digits), "max": round(max(xs), digits)}


def parts(path: GpuKVPath, ids: list[list[int]], pays: list[memoryview], flat: torch.Tensor, reps: int) -> dict:
    """Host us of each step of ``extract_many`` up to its D2H, each alone (``_extract_group``'s
    order), and of the whole prep through the real code (``extract_many`` with the D2H call
    and everything after it cut off)."""
    side, dev = path.stream, path.device
    n = len(ids[0])
    chunks = [(c, i, 0) for c, i in enumerate(ids)]
    index = path._index_side(chunks, n)
    slots = path._slots(pays)
    cur = torch.cuda.current_stream(dev)
    ev = torch.cuda.Event()
    steps = {
        "current_stream(dev)": lambda: torch.cuda.current_stream(dev),
        "current_stream()": lambda: torch.cuda.current_stream(),
        "wait_stream": lambda: side.wait_stream(cur),
        "check_sizes": lambda: path._check_sizes(pays, n),
        "groups+lists": lambda: [[ids[c] for c in g] for g in gpu_path._groups(len(pays), len(pays[0]))],
        "stage": lambda: path._stage(len(pays) * len(pays[0])),
        "chunks list": lambda: [(c, i, 0) for c, i in enumerate(ids)],
        "index_rows (numpy, pinned)": lambda: path._index_rows(chunks, n, ()),
        "index_side (rows + upload)": lambda: path._index_side(chunks, n),
        "launch (given the index)": lambda: path._launch(chunks, flat, n, True, index),
        "rows (index + launch)": lambda: path._rows(chunks, flat, n, True),
        "event + record": lambda: torch.cuda.Event().record(side),
        "slots": lambda: path._slots(pays),
        "pitched_runs": lambda: gpu_path._pitched_runs(slots.addrs, len(pays[0])),
        "move (the D2H call)": lambda: path._move(slots, flat, True),
        "hash_async": lambda: path._hash_async(flat, len(pays), after=ev),
    }
    ev.record(side)
    real_move = path._move

    def cut(*args, **kw):  # the D2H is queued: stop the save here (its clean-up waits for the copy)
        real_move(*args, **kw)
        raise _Cut(time.perf_counter())

    def prep() -> _Cut:
        path._move = cut
        try:
            path.extract_many(ids, pays)
        except _Cut as c:
            return c
        finally:
            del path._move
        raise AssertionError("extract_many returned without its D2H call")

    steps["extract_many up to its D2H call"] = prep
    out = {}
    for name, fn in steps.items():
        xs = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            got = fn()
            xs.append(((got.at if isinstance(got, _Cut) else time.perf_counter()) - t) * 1e6)
        torch.cuda.synchronize()
        out[name] = summary(xs)
    return out


class _Cut(Exception):
    def __init__(self, at: float) -> None:
        self.at = at


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--parts", type=int, default=300)
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    layers = [torch.randn(NB, BS, H, 2 * D, device="cuda").to(torch.bfloat16) for _ in range(L)]
    rows = [t.reshape(NB, -1) for t in layers]
    path = GpuKVPath(rows)
    per_block = rows[0][0].numel() * 2 * L
    blocks = CHUNK // per_block
    segs = [Segment.create(f"pdkv-tl-{uuid.uuid4().hex[:8]}", 1 << 30) for _ in range(2)]
    huge_ok = True
    try:
        segs[1]._mmap.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError) as e:
        huge_ok = f"{type(e).__name__}: {e}"
    key = b"k" * 16
    rt = _memcpy_2d_async()
    try:
        pays = [segs[0].payload(c * (CHUNK + HEADER_BYTES), CHUNK) for c in range(CHUNKS)]
        huge = segs[1].payload(0, TOTAL)
        for p in (pays[0], huge):
            assert path.registry.pinned(p), "the segment could not be registered"
        ids = [list(range(c * blocks, (c + 1) * blocks)) for c in range(CHUNKS)]
        want = path.extract_many(ids, pays)
        seg_addr = ctypes.addressof(ctypes.c_char.from_buffer(segs[0].buf))
        huge_addr = ctypes.addressof(ctypes.c_char.from_buffer(segs[1].buf))
        slot_addrs = path._slots(pays).addrs
        gpu = torch.empty(TOTAL, dtype=torch.uint8, device="cuda")
        pinned = torch.empty(TOTAL, dtype=torch.uint8, pin_memory=True)
        flat = path._stage(TOTAL)
        side = path.stream

        def timed(fn) -> float:
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t) * 1e6

        def contiguous(addr: int) -> None:
            assert rt(addr, TOTAL, gpu.data_ptr(), TOTAL, TOTAL, 1, D2H, side.cuda_stream) == 0

        def pitched() -> None:
            path._move(path._slots(pays), flat, to_host=True)
            side.synchronize()

        wrong = []

        def save() -> None:
            taken = path.extract_many(ids, pays)
            for c in range(CHUNKS):
                segs[0].seal(c * (CHUNK + HEADER_BYTES), key, CHUNK, taken[c])
            if taken != want:
                wrong.append(taken)

        def save_jit() -> None:
            path._copy_rows.direct = False
            try:
                save()
            finally:
                path._copy_rows.direct = True

        stages: dict[str, list[float]] = {}
        real_rows, real_move = path._rows, path._move

        def traced() -> float:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            clock: dict[str, float] = {}

            def rows_(*args, **kw):
                real_rows(*args, **kw)
                ev[1].record(side)

            def move_(*args, **kw):
                real_move(*args, **kw)
                ev[2].record(side)
                clock["queued"] = time.perf_counter()

            path._rows, path._move = rows_, move_
            torch.cuda.synchronize()
            try:
                t0 = time.perf_counter()
                ev[0].record(side)
                save()
                t1 = time.perf_counter()
            finally:
                del path._rows, path._move
            torch.cuda.synchronize()
            total = (t1 - t0) * 1e6
            ready, d2h_end = ev[0].elapsed_time(ev[1]) * 1e3, ev[0].elapsed_time(ev[2]) * 1e3
            for name, v in (("prep", (clock["queued"] - t0) * 1e6), ("ready", ready), ("d2h", d2h_end - ready),
                            ("tail", total - d2h_end), ("total", total)):
                stages.setdefault(name, []).append(v)
            return total

        cases = {
            "pinned": lambda: timed(lambda: pinned.copy_(gpu, non_blocking=True)),
            "seg": lambda: timed(lambda: contiguous(seg_addr)),
            "seg_huge": lambda: timed(lambda: contiguous(huge_addr)),
            "pitched": lambda: timed(pitched),
            "save": lambda: timed(save),
            "save_jit": lambda: timed(save_jit),
            "traced": traced,
        }
        for fn in cases.values():  # warm: compiles, registers, faults in
            fn()
        result: dict = {"machine": machine(), "huge_advise": huge_ok, "rounds": a.rounds,
                        "segment_numa_maps": numa_maps(seg_addr), "huge_numa_maps": numa_maps(huge_addr),
                        "pinned_numa_maps": numa_maps(pinned.data_ptr()),
                        "slot_pitches": sorted({b - a_ for a_, b in zip(slot_addrs, slot_addrs[1:], strict=False)})}
        for phase in ("free", "one_core"):
            if phase == "one_core":
                os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[1]})
            times: dict[str, list[float]] = {name: [] for name in cases}
            stages.clear()
            for _ in range(a.rounds):
                order = list(cases)
                random.shuffle(order)
                for name in order:
                    times[name].append(cases[name]())
            ratios = [p / s for p, s in zip(times["pinned"], times["save"], strict=True)]
            jit_ratios = [p / s for p, s in zip(times["pinned"], times["save_jit"], strict=True)]
            out = {name: summary(xs) for name, xs in times.items()}
            out["GBps_p50"] = {name: round(TOTAL / statistics.median(xs) / 1e3, 2) for name, xs in times.items()}
            out["save_vs_pinned_per_round"] = summary(ratios, 3)
            out["save_jit_vs_pinned_per_round"] = summary(jit_ratios, 3)
            medians = {name: statistics.median(xs) for name, xs in times.items()}
            out["save_vs_pinned_of_medians"] = round(medians["pinned"] / medians["save"], 3)
            out["save_jit_vs_pinned_of_medians"] = round(medians["pinned"] / medians["save_jit"], 3)
            out["traced_stages"] = {name: summary(xs) for name, xs in stages.items()}
            # which stage carries the spread: the traced saves in their slowest and fastest tenth
            order = sorted(range(len(stages["total"])), key=stages["total"].__getitem__)
            tenth = max(1, len(order) // 10)
            out["traced_fast_vs_slow_tenth"] = {
                name: [round(statistics.mean(xs[i] for i in order[:tenth]), 1),
                       round(statistics.mean(xs[i] for i in order[-tenth:]), 1)] for name, xs in stages.items()}
            result[phase] = out
            print(f"== {phase}: p50 us", {k: v["p50"] for k, v in out.items() if isinstance(v, dict) and "p50" in v})
            print(f"   GB/s p50 {out['GBps_p50']}")
            print(f"   save/pinned per round {out['save_vs_pinned_per_round']}, of medians "
                  f"{out['save_vs_pinned_of_medians']}; save_jit/pinned per round "
                  f"{out['save_jit_vs_pinned_per_round']}, of medians {out['save_jit_vs_pinned_of_medians']}")
            print(f"   traced stages {out['traced_stages']}")
            print(f"   fastest / slowest tenth of traced saves {out['traced_fast_vs_slow_tenth']}", flush=True)
        result["parts"] = parts(path, ids, pays, flat, a.parts)
        print("   prep's steps alone, host us p50 (p10-p90)",
              {k: f"{v['p50']} ({v['p10']}-{v['p90']})" for k, v in result["parts"].items()}, flush=True)
        assert not wrong and path.extract_many(ids, pays) == want, "a save staged other bytes than the first"
        result["launches"] = dict(path._copy_rows.launches)
        print("gather launches", result["launches"])
        result["meminfo_after"] = machine()["meminfo"]
        print(json.dumps({k: result[k] for k in ("machine", "huge_advise", "segment_numa_maps", "huge_numa_maps",
                                                 "pinned_numa_maps", "slot_pitches", "meminfo_after")}))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        path.close()
        for s in segs:
            with contextlib.suppress(BufferError):  # a view of the mapping is still alive here; the file is gone
                s.close()


if __name__ == "__main__":
    main()
