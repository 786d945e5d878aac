"""KV store data paths side by side, in one run: put/get bandwidth and single-chunk latency.

    .venv/bin/python -m bench.kvstore [--quick] [--sizes 64K,1M,16M] [--batch-mib 64]
                                      [--out bench/results/kvstore.json]

Every get delivers verified bytes into the caller's buffer, and every put starts from the
caller's bytes, so the methods do the same work:

    memcpy     a plain copy of the same bytes (the physical limit on one node)
    shm        pdserve, same node: lease, copy out of the mapped segment, check xxh3
    raw-tcp    a plain loopback socket to another process, recv_into (the network path's limit)
    tcp        pdserve, cross node: one-sided pull from the agent's slot server
    grpc       pdserve, cross node: the gRPC streaming transport
    redis      the chunk as a Redis value (SET / MGET, copied out)
    ray        Ray's object store (ray.put / ray.get, copied out of the zero-copy view)

The store agent and the socket server run in their own processes, as on a real node. Chunks
are drawn from a pool larger than the CPU caches, so every method reads from memory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METHODS = ("memcpy", "shm", "raw-tcp", "tcp", "grpc", "redis", "ray")
UNITS = {"K": 1 << 10, "M": 1 << 20}

_AGENT = """
import sys, time
from kvstore.agent import StoreAgent
from kvstore.agent_rpc import AgentServers
agent = StoreAgent("bench-A", sys.argv[1], int(sys.argv[2]), sys.argv[3])
servers = AgentServers(agent, "127.0.0.1")
agent.tick()
print("ready", flush=True)
while True:
    time.sleep(1)
    agent.tick()
"""

_SOCKET_SERVER = """
import socket, sys
src = memoryview(bytearray(64 << 20))
srv = socket.create_server(("127.0.0.1", 0))
print("ready", srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept()
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        c.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = bytearray(9)
    sink = memoryview(bytearray(4 << 20))
    while True:
        v, got = memoryview(head), 0
        while got < 9:
            n = c.recv_into(v[got:])
            if not n:
                break
            got += n
        if got < 9:
            break
        op, n = head[0], int.from_bytes(head[1:], "little")
        if op == 1:  # send n bytes
            while n:
                k = min(n, len(src)); c.sendall(src[:k]); n -= k
        else:  # receive n bytes, then ack
            while n:
                n -= c.recv_into(sink, min(n, len(sink)))
            c.sendall(b"k")
    c.close()
"""


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kvstore", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64K,256K,1M,4M,16M", help="chunk sizes")
    p.add_argument("--batch-mib", type=int, default=64, help="bytes moved per timed batch")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per figure (median kept)")
    p.add_argument("--latency-samples", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="two sizes, small batches (CI-sized)")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/kvstore.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batch_mib, args.repeats, args.latency_samples = "64K,1M", 16, 3, 10
    args.size_list = [parse_size(s) for s in args.sizes.split(",")]
    return args


@contextmanager
def subprocess_ready(argv: list[str]) -> Iterator[list[str]]:
    """Start a helper process and wait for its ``ready ...`` line; yields the line's words."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        if not words or words[0] != "ready":
            raise RuntimeError(f"{argv[:3]} did not start")
        yield words[1:]
    finally:
        proc.kill()
        proc.wait()


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm: connections, page faults in fresh buffers
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def latency_us(fn: Callable[[], Any], samples: int) -> float:
    fn()
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


class Workload:
    """``n`` chunks of ``size`` bytes drawn from a pool larger than the caches, and a
    destination buffer for gets."""

    def __init__(self, size: int, batch_bytes: int) -> None:
        self.size = size
        self.n = max(4, batch_bytes // size)
        self.pool = memoryview(bytearray(os.urandom(1 << 20) * (self.n * size // (1 << 20) + 1)))
        self.dest = memoryview(bytearray(self.n * (size + 64)))

    def chunk(self, i: int) -> memoryview:
        return self.pool[i * self.size : (i + 1) * self.size]

    @property
    def total(self) -> int:
        return self.n * self.size


def bench_memcpy(w: Workload, args: argparse.Namespace) -> dict[str, float]:
    def copy_all() -> None:
        for i in range(w.n):
            w.dest[i * w.size : (i + 1) * w.size] = w.chunk(i)

    def copy_one() -> None:
        w.dest[: w.size] = w.chunk(0)

    t = median_time(copy_all, args.repeats)
    return {"put_gbps": w.total / t / 1e9, "get_gbps": w.total / t / 1e9,
            "get_latency_us": latency_us(copy_one, args.latency_samples)}


def bench_store(w: Workload, args: argparse.Namespace, redis_url: str, prefix: str, transport: str) -> dict[str, float]:
    from kvstore.agent_rpc import AgentClient
    from kvstore.client import ChunkToSave, StoreClient

    capacity = 2 * w.n * (w.size + 128)
    with subprocess_ready([sys.executable, "-c", _AGENT, redis_url, str(capacity), prefix]):
        node = "bench-A" if transport == "shm" else "bench-B"
        c = StoreClient(redis_url, prefix, node, transport="tcp" if transport == "shm" else transport)
        agent = AgentClient(c.meta.agent("bench-A").address)  # type: ignore[union-attr]
        keys = [uuid.uuid4().bytes for _ in range(w.n)]

        def put_all() -> None:
            agent.clear()
            stored = c.batch_put([ChunkToSave(k, w.size) for k in keys],
                                 lambda i, v: v.__setitem__(slice(None), w.chunk(i)), node_id="bench-A")
            assert stored == w.n, f"stored {stored} of {w.n}"

        put_s = median_time(put_all, args.repeats)
        locs = [loc for loc in c.lookup(keys) if loc]

        def get_all() -> None:
            ok = c.batch_get(keys, locs, lambda i, p: None, w.dest)
            assert all(ok), "a get failed"

        get_s = median_time(get_all, args.repeats)
        one = w.dest[: w.size + 64]
        lat = latency_us(lambda: c.batch_get(keys[:1], locs[:1], lambda i, p: None, one), args.latency_samples)
        c.close()
        agent.close()
    return {"put_gbps": w.total / put_s / 1e9, "get_gbps": w.total / get_s / 1e9, "get_latency_us": lat}


def bench_raw_tcp(w: Workload, args: argparse.Namespace) -> dict[str, float]:
    with subprocess_ready([sys.executable, "-c", _SOCKET_SERVER]) as (port,):
        s = socket.create_connection(("127.0.0.1", int(port)))
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def pull(n_chunks: int) -> None:
            s.sendall(b"\x01" + (n_chunks * w.size).to_bytes(8, "little"))
            for i in range(n_chunks):
                view, got = w.dest[i * w.size : (i + 1) * w.size], 0
                while got < w.size:
                    got += s.recv_into(view[got:])

        def push() -> None:
            s.sendall(b"\x02" + w.total.to_bytes(8, "little"))
            for i in range(w.n):
                s.sendall(w.chunk(i))
            assert s.recv(1) == b"k"

        get_s = median_time(lambda: pull(w.n), args.repeats)
        put_s = median_time(push, args.repeats)
        lat = latency_us(lambda: pull(1), args.latency_samples)
        s.close()
    return {"put_gbps": w.total / put_s / 1e9, "get_gbps": w.total / get_s / 1e9, "get_latency_us": lat}


def bench_redis(w: Workload, args: argparse.Namespace, redis_url: str, prefix: str) -> dict[str, float]:
    import redis

    r = redis.Redis.from_url(redis_url)
    names = [f"{prefix}:blob:{i}" for i in range(w.n)]

    def put_all() -> None:
        pipe = r.pipeline(transaction=False)
        for i, name in enumerate(names):
            pipe.set(name, bytes(w.chunk(i)))
        pipe.execute()

    def get(k: int) -> None:
        for i, value in enumerate(r.mget(names[:k])):
            w.dest[i * w.size : (i + 1) * w.size] = value

    put_s = median_time(put_all, args.repeats)
    get_s = median_time(lambda: get(w.n), args.repeats)
    lat = latency_us(lambda: get(1), args.latency_samples)
    r.delete(*names)
    r.close()
    return {"put_gbps": w.total / put_s / 1e9, "get_gbps": w.total / get_s / 1e9, "get_latency_us": lat}


def bench_ray(w: Workload, args: argparse.Namespace) -> dict[str, float]:
    import numpy as np
    import ray

    refs: list[Any] = []

    def put_all() -> None:
        refs.clear()
        refs.extend(ray.put(np.frombuffer(w.chunk(i), dtype=np.uint8)) for i in range(w.n))

    def get(k: int) -> None:
        for i, arr in enumerate(ray.get(refs[:k])):
            w.dest[i * w.size : (i + 1) * w.size] = memoryview(arr)

    put_s = median_time(put_all, args.repeats)
    get_s = median_time(lambda: get(w.n), args.repeats)
    lat = latency_us(lambda: get(1), args.latency_samples)
    refs.clear()
    return {"put_gbps": w.total / put_s / 1e9, "get_gbps": w.total / get_s / 1e9, "get_latency_us": lat}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from cluster.env import pin_ray_auth_mode
    from cluster.runtime import start_redis, stop_pid

    results: dict[str, dict[str, dict[str, float]]] = {m: {} for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="pdkv-bench-") as tmp:
        redis_url, _port, redis_pid = start_redis(Path(tmp))
        pin_ray_auth_mode()
        ray.init(num_cpus=1, include_dashboard=False, object_store_memory=1 << 30, log_to_driver=False,
                 _temp_dir=f"/tmp/pdray-{uuid.uuid4().hex[:8]}")
        try:
            for size in args.size_list:
                w = Workload(size, args.batch_mib << 20)
                label = f"{size >> 10} KiB" if size < (1 << 20) else f"{size >> 20} MiB"
                print(f"chunk {label} x {w.n}", flush=True)
                prefix = f"bench{uuid.uuid4().hex[:6]}"
                results["memcpy"][label] = bench_memcpy(w, args)
                for t in ("shm", "tcp", "grpc"):
                    results[t][label] = bench_store(w, args, redis_url, prefix, t)
                results["raw-tcp"][label] = bench_raw_tcp(w, args)
                results["redis"][label] = bench_redis(w, args, redis_url, prefix)
                results["ray"][label] = bench_ray(w, args)
        finally:
            ray.shutdown()
            stop_pid(redis_pid)
    return results


def ratios(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The figures the store is held to, per chunk size."""
    out: dict[str, dict[str, float]] = {}
    for label in results["memcpy"]:
        def r(a: str, b: str, fig: str = "get_gbps", label: str = label) -> float:
            return round(results[a][label][fig] / results[b][label][fig], 2)

        out[label] = {
            "shm_get/memcpy": r("shm", "memcpy"), "tcp_get/raw_tcp": r("tcp", "raw-tcp"),
            "grpc_get/raw_tcp": r("grpc", "raw-tcp"), "shm_put/memcpy": r("shm", "memcpy", "put_gbps"),
            "tcp_get/redis": r("tcp", "redis"), "tcp_get/ray": r("tcp", "ray"),
            "shm_get/redis": r("shm", "redis"), "shm_get/ray": r("shm", "ray"),
        }
    return out


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    labels = list(results["memcpy"])
    lines = ["| method | " + " | ".join(f"{lb} get GB/s / put GB/s / get µs" for lb in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for m in METHODS:
        cells = [f"{results[m][lb]['get_gbps']:.2f} / {results[m][lb]['put_gbps']:.2f} / "
                 f"{results[m][lb]['get_latency_us']:.0f}" for lb in labels]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    rat = ratios(results)
    print(table(results))
    print(json.dumps(rat, indent=1))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], "-m", "bench.kvstore", *(argv or sys.argv[1:])]),
        "commit": commit.strip(), "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "results": results, "ratios": rat, "table": table(results),
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
