"""Router microbenchmark: how long one routing decision takes, per policy, and what the index
costs in memory.

    .venv/bin/python -m bench.router [--replicas 8,64,512] [--chunks 100000]
                                     [--decisions 3000] [--out bench/results/router.json]

The real policy objects (``router.policy``) decide over constructed states: ``--chunks``
chunks indexed in the store index (spread over the nodes, 8 replicas a node, as on GPU
nodes) and in the replicas' engine-cache index; prompts of ``--prompt-chunks`` chunks drawn
from shared prefixes, so the indexes answer real matches. Each decision is timed alone
(perf_counter_ns) as the request router runs it (new load reports into the state, the
policy's decision, the decision recorded), the policies take turns in rotated order (the
machine is shared), and ``round_robin`` is the floor: the cost of any decision at all. What
the router does per request once the request went out (the explanation kept, the prompt's
chunks into the index, the ingress's ``finished``) is timed apart and shown beside it: CPU
per request, not wait. Memory per chunk is measured with tracemalloc while the indexes are
filled.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import subprocess
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvstore.messages import ReplicaLoad
from router.policy import POLICIES, RoutingPolicy, RoutingRequest, RoutingState, make_policy

REPO = Path(__file__).resolve().parents[2]
PER_NODE = 8
WARMUP = 50  # untimed decisions per turn: the policy before it evicted this one's data from the caches


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.router", description=__doc__.split("\n")[0])
    p.add_argument("--replicas", default="8,64,512", help="prefill pool sizes")
    p.add_argument("--chunks", type=int, default=100_000, help="chunks indexed")
    p.add_argument("--prompt-chunks", type=int, default=32, help="chunks per prompt")
    p.add_argument("--decisions", type=int, default=3000, help="timed decisions per policy and size")
    p.add_argument("--quick", action="store_true", help="small sizes and few decisions (CI-sized)")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/router.json")
    args = p.parse_args(argv)
    if args.quick:
        args.replicas, args.chunks, args.decisions = "8,64", 20_000, 300
    return args


class Workload:
    """Prompts as chains of chunk keys: ``families`` shared prefixes (system prompts, earlier
    turns), each prompt a family's prefix plus its own tail."""

    def __init__(self, rng: random.Random, prompt_chunks: int, families: int = 200) -> None:
        self.rng, self.n = rng, prompt_chunks
        self.prefixes = [[rng.randbytes(16) for _ in range(prompt_chunks)] for _ in range(families)]

    def prompt(self, rid: str) -> RoutingRequest:
        base = self.rng.choice(self.prefixes)
        shared = self.rng.randint(0, self.n)
        keys = tuple(base[:shared]) + tuple(self.rng.randbytes(16) for _ in range(self.n - shared))
        return RoutingRequest(rid, "prefill", self.n * 32 + self.rng.randint(1, 31), keys)


def fill(state: RoutingState, wl: Workload, replicas: list[ReplicaLoad], chunks: int) -> None:
    """Index ``chunks`` chunks: every family's prefix on some nodes and replicas, then
    unrelated chunks until the count is reached."""
    rng = wl.rng
    for prefix in wl.prefixes:
        for r in rng.sample(replicas, min(3, len(replicas))):
            state.store.stored(r.node_id, prefix)
            state.engines.record(r.replica, prefix[: rng.randint(1, len(prefix))])
    while len(state.store) < chunks:
        r = rng.choice(replicas)
        batch = [rng.randbytes(16) for _ in range(wl.n)]
        state.store.stored(r.node_id, batch)
        state.engines.record(r.replica, batch)


def loads(rng: random.Random, n: int) -> list[ReplicaLoad]:
    return [ReplicaLoad(f"prefill-{i:04d}", f"node-{i // PER_NODE:04d}", running=rng.randint(0, 8),
                        waiting=rng.randint(0, 4), kv_usage=rng.random(), queued_tokens=rng.randint(0, 8000),
                        kv_events="tcp://bench")  # prefix caching on: a routed prompt is recorded as cached
            for i in range(n)]


def time_policy(policy: RoutingPolicy, state: RoutingState, wl: Workload, pool: list[ReplicaLoad],
                n: int) -> tuple[list[float], list[float]]:
    """What the request router does per decision, timed: the pool's new reports go to the
    state (one replica's, as when the last request landed there), then the policy decides
    and the decision is recorded (``routed``): the decision. Then, timed apart, what it runs
    once the request went out (``settle``: the explanation kept, the prompt's chunks into the
    index) and the ingress's ``finished``: work per request, but not in its wait."""
    decide, after = [], []
    rng = wl.rng
    clock = time.perf_counter_ns
    for i in range(-WARMUP, n):
        request = wl.prompt(f"r{i}")
        j = rng.randrange(len(pool))
        pool[j] = replace(pool[j], inflight=rng.randint(0, 8), queued_tokens=rng.randint(0, 8000))
        t0 = clock()
        state.settle()  # as PDRequestRouter.choose_replicas: nothing left here, settled below
        state.observe("prefill", pool, [pool[j]])
        decision = policy.route(request, pool)
        state.routed(request, decision)
        t1 = clock()
        state.settle()
        state.finished(request.request_id)
        if i >= 0:
            decide.append((t1 - t0) / 1000)
            after.append((clock() - t1) / 1000)
    return decide, after


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_size(n_replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(n_replicas)
    wl = Workload(rng, args.prompt_chunks)
    pool = loads(rng, n_replicas)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state = RoutingState(chunk_tokens=32, max_chunks=args.chunks)
    fill(state, wl, pool, args.chunks)
    index_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    store_chunks, engine_chunks, distinct = len(state.store), len(state.engines), state.indexed_chunks
    policies = {name: make_policy(name, state, "prefill", random.Random(1)) for name in POLICIES}
    samples: dict[str, list[float]] = {name: [] for name in POLICIES}
    after: dict[str, list[float]] = {name: [] for name in POLICIES}
    rounds = 5
    for turn in range(rounds):
        order = list(POLICIES[turn % len(POLICIES):] + POLICIES[: turn % len(POLICIES)])
        for name in order:
            decide, later = time_policy(policies[name], state, wl, pool, args.decisions // rounds)
            samples[name] += decide
            after[name] += later
    floor = statistics.median(samples["round_robin"])
    result: dict[str, Any] = {
        "replicas": n_replicas, "store_chunks": store_chunks, "engine_chunks": engine_chunks,
        "distinct_chunks": distinct,  # one table holds both indexes: a chunk in both is one entry
        "index_bytes_per_chunk": round(index_bytes / distinct, 1), "policies": {},
    }
    for name, xs in samples.items():
        result["policies"][name] = {"p50_us": round(statistics.median(xs), 1), "p99_us": round(pct(xs, 0.99), 1),
                                    "p50_over_round_robin": round(statistics.median(xs) / floor, 1),
                                    "after_p50_us": round(statistics.median(after[name]), 1),
                                    "after_p99_us": round(pct(after[name], 0.99), 1)}
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| policy | " + " | ".join(f"{r['replicas']} replicas p50 / p99 (us)" for r in results)
             + " | after the request went out, p50 / p99 (us) |", "|---|" + "---:|" * (len(results) + 1)]
    for name in POLICIES:
        cells = [f"{r['policies'][name]['p50_us']} / {r['policies'][name]['p99_us']}" for r in results]
        later = ", ".join(f"{r['policies'][name]['after_p50_us']} / {r['policies'][name]['after_p99_us']}"
                          for r in results)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {later} |")
    mem = " | ".join(f"{r['index_bytes_per_chunk']}" for r in results)
    lines.append(f"| index bytes per chunk | {mem} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = [run_size(int(n), args) for n in args.replicas.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    report = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit,
              "chunks": args.chunks, "prompt_chunks": args.prompt_chunks, "decisions": args.decisions,
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))
    print(f"raw figures: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
