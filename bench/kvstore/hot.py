"""A hot prefix read again and again from another node, with and without replicas of hot
chunks (``kvstore.replicate_after``), side by side in one run.

    .venv/bin/python -m bench.kvstore.hot [--chunk 1M] [--mib 64] [--reads 8] [--pin]
                                          [--out bench/results/kvstore-hot.json]

Node A's agent holds the chunks; node B has an agent of its own (for the replicas). Two
readers on B take turns reading every chunk, verified, into their buffer: ``pull`` without
replication (every read crosses nodes), ``replica`` with ``replicate_after=2`` (its first two
reads cross nodes; the second makes the chunks hot, they are pulled once more into B's segment
in the background, and the later reads come from there). Reported per read: both readers'
times and their ratio; the summary is the median over the reads after the second (the
replication itself, waited for untimed before the third read, is a third pull, once).
``--pin`` runs the agents on CPU 0 and the readers on CPU 1, as two nodes would
(``bench.kvstore --pin``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.kvstore.__main__ import READER_CPUS, SERVE_CPUS, _reader_on
from bench.kvstore.helpers import AGENT_SCRIPT, REPO, Workload, parse_size
from bench.kvstore.methods import _Process


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kvstore.hot", description=__doc__.split("\n")[0])
    p.add_argument("--chunk", default="1M", help="chunk size")
    p.add_argument("--mib", type=int, default=64, help="size of the hot prefix")
    p.add_argument("--reads", type=int, default=8, help="reads per reader (the first two make chunks hot)")
    p.add_argument("--pin", action="store_true", help="agents on CPU 0, readers on CPU 1")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/kvstore-hot.json")
    args = p.parse_args(argv)
    if args.reads < 3:
        p.error("--reads must be at least 3: two to make the chunks hot, then reads of the replicas")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.runtime import start_redis, stop_pid
    from kvstore.client import ChunkToSave, StoreClient

    w = Workload(parse_size(args.chunk), args.mib << 20)
    serve = SERVE_CPUS if args.pin else None
    reader_cpus = READER_CPUS if args.pin else None
    with tempfile.TemporaryDirectory(prefix="pdkv-hot-") as tmp:
        redis_url, _port, redis_pid = start_redis(Path(tmp))
        prefix = f"hot{uuid.uuid4().hex[:6]}"
        capacity = 2 * w.n * (w.size + 128)
        agents = [_Process([sys.executable, "-c", AGENT_SCRIPT, redis_url, str(capacity), prefix, node], serve)
                  for node in ("bench-A", "bench-B")]
        writer = StoreClient(redis_url, prefix, "bench-A")
        readers = {"pull": StoreClient(redis_url, prefix, "bench-B"),
                   "replica": StoreClient(redis_url, prefix, "bench-B", replicate_after=2)}
        try:
            keys = [uuid.uuid4().bytes for _ in range(w.n)]
            stored = writer.batch_put([ChunkToSave(k, w.size) for k in keys],
                                      lambda i, v: v.__setitem__(slice(None), w.chunk(i)))
            assert stored == w.n, f"stored {stored} of {w.n}"
            times: dict[str, list[float]] = {name: [] for name in readers}
            sources: dict[str, list[str]] = {name: [] for name in readers}
            for r in range(args.reads):
                if r == 2:
                    assert readers["replica"].replicas_settled(60), "replication did not finish"
                order = list(readers) if r % 2 == 0 else list(reversed(readers))
                for name in order:
                    c = readers[name]
                    locs = c.lookup(keys)
                    with _reader_on(reader_cpus):
                        t = time.perf_counter()
                        ok = c.batch_get(keys, locs, lambda i, p: None, w.dest)  # type: ignore[arg-type]
                        times[name].append(time.perf_counter() - t)
                    assert all(ok), f"{name}: a read failed"
                    sources[name].append(",".join(sorted({loc.node_id for loc in locs if loc})))
            counters = readers["replica"].drain_counters()
        finally:
            for c in (writer, *readers.values()):
                c.close()
            for a in agents:
                a.close()
            stop_pid(redis_pid)
    later = slice(2, None)
    per_read = [round(p / q, 2) for p, q in zip(times["pull"], times["replica"], strict=True)]
    return {
        "chunk": w.label, "chunks": w.n, "mib": args.mib,
        "read_ms": {name: [round(t * 1e3, 2) for t in ts] for name, ts in times.items()},
        "read_gbps_median_after_2": {name: round(w.total / statistics.median(ts[later]) / 1e9, 2)
                                     for name, ts in times.items()},
        "pull_over_replica_per_read": per_read,
        "speedup_median_after_2": round(statistics.median(per_read[later]), 2),
        "sources": sources, "replicated_chunks": counters.get("replicated_chunks", 0),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(f"hot prefix: {result['mib']} MiB in {result['chunks']} chunks of {result['chunk']}, read from node B")
    print("| read | " + " | ".join(str(i + 1) for i in range(args.reads)) + " |")
    print("|---|" + "---:|" * args.reads)
    for name, ms in result["read_ms"].items():
        print(f"| {name} ms | " + " | ".join(f"{m:.1f}" for m in ms) + " |")
    print("| pull / replica | " + " | ".join(f"{x:.2f}x" for x in result["pull_over_replica_per_read"]) + " |")
    gbps = result["read_gbps_median_after_2"]
    print(f"reads 3..{args.reads}: replica {gbps['replica']} GB/s, pull {gbps['pull']} GB/s, "
          f"median speedup {result['speedup_median_after_2']}x; {result['replicated_chunks']} chunks replicated")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": shlex.join([".venv/bin/python", "-m", "bench.kvstore.hot",
                               *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit.strip(), "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "result": result,
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
