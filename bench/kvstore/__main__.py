"""KV store data paths side by side, in one run: put/get bandwidth and single-chunk latency.

    .venv/bin/python -m bench.kvstore [--quick] [--sizes 64K,1M,16M] [--batch-mib 64]
                                      [--repeats 7] [--pin] [--out bench/results/kvstore.json]

Every get delivers the bytes into the caller's buffer and every put starts from the caller's
bytes, so the methods do the same work:

    memcpy      a plain copy of the same bytes (the limit on one node)
    shm         pdserve, same node: pin, copy out of the mapped segment, verify xxh3
    ray         Ray's object store on the same node (zero-copy view, then the copy out)
    raw-tcp     a plain loopback socket to another process (the limit of the network path)
    tcp         pdserve, other node: one-sided pull from the agent's slot server, verified
    grpc        pdserve, other node: the gRPC streaming transport, verified
    ray-remote  Ray's object store read from an actor on a second Ray node
    redis       the chunk as a Redis value (SET / MGET, copied out)

On two cores a cross-node method's serving process and its reader share the machine with
whatever else runs, and the scheduler may put both on one core for a while. ``--pin`` runs
them as two nodes would: the serving process (the agent, the raw socket server) on CPU 0, the
reader's threads on CPU 1 while a cross-node method is timed (raw-tcp, tcp and grpc alike).

The machine is shared and noisy, so the methods take turns: every repeat times each method
once, in a rotated order, and a ratio is the median of the per-repeat ratios. Agents and the
socket server run in their own processes, as on a real node; chunks come from a pool larger
than the CPU caches.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.kvstore.helpers import REPO, Workload, parse_size
from bench.kvstore.methods import Fetcher, Memcpy, Method, RawTcp, RayObjects, RedisBlob, Store

# --pin: a cross-node method's serving process on CPU 0 and its reader on CPU 1, as two nodes.
SERVE_CPUS, READER_CPUS = {0}, {1}
ORDER = ("memcpy", "shm", "ray", "raw-tcp", "tcp", "grpc", "ray-remote", "redis")
# (numerator, denominator) pairs the store is held to: same node against its limit and the
# peers, the network path against its limit and the peers.
RATIOS = (
    ("shm", "memcpy"), ("shm", "ray"), ("shm", "redis"),
    ("tcp", "raw-tcp"), ("grpc", "raw-tcp"), ("tcp", "ray-remote"), ("tcp", "redis"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kvstore", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64K,256K,1M,4M,16M", help="chunk sizes")
    p.add_argument("--batch-mib", type=int, default=64, help="bytes moved per timed batch")
    p.add_argument("--repeats", type=int, default=7, help="timed turns per method")
    p.add_argument("--latency-samples", type=int, default=15, help="single-chunk gets per method")
    p.add_argument("--methods", default=",".join(ORDER), help="methods to run (their ratios are printed)")
    p.add_argument("--quick", action="store_true", help="two sizes, small batches (CI-sized)")
    p.add_argument("--pin", action="store_true",
                   help="cross-node methods as on two nodes: the serving process (agent, socket server) on CPU 0, "
                   "the reader's threads on CPU 1 while they are timed")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/kvstore.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batch_mib, args.repeats, args.latency_samples = "64K,1M", 16, 3, 5
    args.size_list = [parse_size(s) for s in args.sizes.split(",")]
    args.method_set = set(args.methods.split(","))
    if unknown := args.method_set - set(ORDER):
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(ORDER)}")
    return args


@contextmanager
def _reader_on(cpus: set[int] | None) -> Iterator[None]:
    """Every thread of this process on ``cpus`` for the block (None: leave them be), as a
    reader on a node of its own; the previous masks come back after."""
    if not cpus:
        yield
        return
    usual = os.sched_getaffinity(0)
    before = {}
    for tid in (int(t) for t in os.listdir("/proc/self/task")):
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that ended meanwhile
            pass
    try:
        yield
    finally:  # threads started inside (a pool's first worker) get the process's usual CPUs
        for tid in (int(t) for t in os.listdir("/proc/self/task")):
            try:
                os.sched_setaffinity(tid, before.get(tid, usual))
            except OSError:
                pass


def _timed(m: Method, what: str, k: int = 0, reader_cpus: set[int] | None = None) -> float:
    with _reader_on(reader_cpus if m.cross_node else None):
        return _timed_here(m, what, k)


def _timed_here(m: Method, what: str, k: int = 0) -> float:
    if what == "put":
        m.before_put()
        t = time.perf_counter()
        m.put()
        return time.perf_counter() - t
    m.before_get()
    t = time.perf_counter()
    own = m.get(k)
    return own if own is not None else time.perf_counter() - t


def measure(methods: list[Method], w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved turns; per method the median figures, and per ratio the median of the
    ratios taken within each turn."""
    for m in methods:  # warm: connections, page faults, and data in place for the gets
        m.before_put()
        m.put()
        m.get(w.n)
    times: dict[str, dict[str, list[float]]] = {m.name: {"put": [], "get": [], "one": []} for m in methods}
    reader = READER_CPUS if args.pin else None
    for r in range(args.repeats):
        turn = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in turn:
            times[m.name]["put"].append(_timed(m, "put", reader_cpus=reader))
        for m in turn:
            times[m.name]["get"].append(_timed(m, "get", w.n, reader))
    for _ in range(args.latency_samples):
        for m in methods:
            times[m.name]["one"].append(_timed(m, "get", 1, reader))
    figures = {
        name: {
            "get_gbps": w.total / statistics.median(t["get"]) / 1e9,
            "put_gbps": w.total / statistics.median(t["put"]) / 1e9,
            "get_latency_us": statistics.median(t["one"]) * 1e6,
        }
        for name, t in times.items()
    }
    def turns(a: str, b: str, what: str = "get") -> list[float]:  # a's bandwidth over b's, per turn
        return sorted(tb / ta for ta, tb in zip(times[a][what], times[b][what], strict=True))

    pairs = {f"{a}/{b}": turns(a, b) for a, b in RATIOS if a in times and b in times}
    if "shm" in times and "memcpy" in times:
        pairs["shm_put/memcpy"] = turns("shm", "memcpy", "put")
    return {"figures": figures, "get_ratios": {name: round(statistics.median(xs), 2) for name, xs in pairs.items()},
            # the middle half of the per-turn ratios: how far this shared machine moved them
            "get_ratio_quartiles": {name: [round(q, 2) for q in _quartiles(xs)] for name, xs in pairs.items()},
            "times_s": times}


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _method(name: str, w: Workload, redis_url: str, fetcher: Any, pin: bool = False) -> Method:
    serve = SERVE_CPUS if pin else None
    if name == "memcpy":
        return Memcpy(w)
    if name in ("shm", "tcp", "grpc"):
        return Store(w, redis_url, name, serve)
    if name in ("ray", "ray-remote"):
        return RayObjects(w, fetcher if name == "ray-remote" else None)
    if name == "raw-tcp":
        return RawTcp(w, serve)
    return RedisBlob(w, redis_url)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.env import pin_ray_auth_mode

    pin_ray_auth_mode()  # before Ray is imported: it reads the mode then
    import ray
    from ray.cluster_utils import Cluster

    from cluster.runtime import start_redis, stop_pid

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pdkv-bench-") as tmp:
        redis_url, _port, redis_pid = start_redis(Path(tmp))
        store_gib = 1 << 30
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store_gib})
        cluster.add_node(num_cpus=1, resources={"bench_b": 1}, object_store_memory=store_gib)
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
            for size in args.size_list:
                w = Workload(size, args.batch_mib << 20)
                print(f"chunk {w.label} x {w.n}", flush=True)
                fetcher = ray.remote(Fetcher).options(resources={"bench_b": 0.01}, num_cpus=0).remote(w.total)
                methods = [_method(name, w, redis_url, fetcher, args.pin) for name in ORDER if name in args.method_set]
                try:
                    results[w.label] = measure(methods, w, args)
                finally:
                    for m in methods:
                        m.close()
                    ray.kill(fetcher)
        finally:
            ray.shutdown()
            cluster.shutdown()
            stop_pid(redis_pid)
    return results


def table(results: dict[str, Any]) -> str:
    labels = list(results)
    lines = ["| method | " + " | ".join(f"{lb}: get GB/s · put GB/s · 1-chunk get µs" for lb in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for name in (n for n in ORDER if n in results[labels[0]]["figures"]):
        cells = []
        for lb in labels:
            f = results[lb]["figures"][name]
            cells.append(f"{f['get_gbps']:.2f} · {f['put_gbps']:.2f} · {f['get_latency_us']:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratio_names = list(results[labels[0]]["get_ratios"])
    head = "| get bandwidth ratio: median (middle half of the turns) | " + " | ".join(labels) + " |"
    lines += ["", head, "|---|" + "---:|" * len(labels)]
    for r in ratio_names:
        cells = []
        for lb in labels:
            lo, hi = results[lb].get("get_ratio_quartiles", {}).get(r, (None, None))
            spread = f" ({lo:.2f}-{hi:.2f})" if lo is not None else ""
            cells.append(f"{results[lb]['get_ratios'][r]:.2f}x{spread}")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    text = table(results)
    print(text)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": shlex.join([".venv/bin/python", "-m", "bench.kvstore", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit.strip(), "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "results": results, "table": text,
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
