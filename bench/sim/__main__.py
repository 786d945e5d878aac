"""Discrete-event simulation of a pdserve cluster, driving the real routing policies.

    .venv/bin/python -m bench.sim --replicas 64,512 \\
        --policies round_robin,least_loaded,prefix_tree_approx,kv_aware \\
        --profile h100-llama8b --workload multiturn --out bench/results/sim.json
    .venv/bin/python -m bench.sim --workload trace conversation_trace.jsonl --tokens-per-id 512 ...

For each cluster size: one request stream (seeded), a rate sweep around the cost model's
capacity estimate, every policy at every rate (until it drops below the SLO target), a
markdown table at the main load with kv_aware's ratio to each policy, the JSON of every run,
and PNG plots when matplotlib imports. What is simulated and what is not: docs/sim.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench.sim.metrics import SLO
from bench.sim.profiles import PROFILES, profile
from bench.sim.report import plots, sweep_table, table, to_json, write_json
from bench.sim.runner import SweepConfig, run
from bench.sim.streams import RequestStream, StreamSpec
from bench.sim.workload import write_trace
from router.policy import POLICIES

REPO = Path(__file__).resolve().parents[2]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sim", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--replicas", type=_ints, default=(64, 512), help="cluster sizes (replicas, all roles)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"from {', '.join(POLICIES)}")
    p.add_argument("--profile", default="h100-llama8b", choices=sorted(PROFILES), help="cost model")
    p.add_argument("--workload", nargs="+", default=["multiturn"], metavar="KIND",
                   help="multiturn | trace FILE (Mooncake JSONL)")
    p.add_argument("--requests", type=_ints, default=(6000, 12000),
                   help="requests per run, one per size (or one for all)")
    p.add_argument("--pd", default="1:1", help="prefill:decode replica ratio, e.g. 1:1 or 3:1")
    p.add_argument("--per-node", type=int, default=8, help="replicas per node (8: one per GPU)")
    p.add_argument("--loads", type=_floats, default=(0.7, 0.85, 1.0, 1.15, 1.3),
                   help="sweep rates, as fractions of the capacity estimate")
    p.add_argument("--main-load", type=float, default=1.0, help="the load of the side-by-side table")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds (default: the profile's)")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds (default: the profile's)")
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment the sweep looks for")
    p.add_argument("--think-s", type=float, default=0.5, help="multiturn: mean of the exponential part of a turn gap")
    p.add_argument("--think-min-s", type=float, default=0.25, help="multiturn: fixed part of a turn gap")
    p.add_argument("--tokens-per-id", type=int, default=512, help="prompt tokens per hash id, as replayed")
    p.add_argument("--trace-tokens-per-id", type=int, default=512, help="tokens per hash id in the trace file")
    p.add_argument("--arrivals", default="trace", choices=("trace", "poisson"),
                   help="the workload's own timing (scaled to the rate) or Poisson at the rate")
    p.add_argument("--feed-lag-s", type=float, default=0.0, help="store change stream -> router index delay")
    p.add_argument("--stats-period-s", type=float, default=0.5,
                   help="how often replicas report their load (Serve's request_routing_stats_period_s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/sim.json")
    p.add_argument("--save-trace", type=Path, default=None,
                   help="write the first size's main-load stream here as a Mooncake-format trace")
    args = p.parse_args(argv)
    kind = args.workload[0]
    if kind not in ("multiturn", "trace") or (kind == "trace") != (len(args.workload) == 2) or len(args.workload) > 2:
        p.error("--workload takes 'multiturn' or 'trace FILE'")
    if len(args.requests) == 1:
        args.requests = args.requests * len(args.replicas)
    return args


def config(args: argparse.Namespace) -> SweepConfig:
    cost = profile(args.profile)
    pd = args.pd.split(":")
    if len(pd) != 2:
        raise ValueError(f"--pd takes P:D, e.g. 1:1, got {args.pd!r}")
    stream = StreamSpec(args.workload[0], Path(args.workload[1]) if len(args.workload) == 2 else None,
                        args.tokens_per_id, args.trace_tokens_per_id, args.think_s, args.think_min_s, args.arrivals)
    policies = tuple(x.strip() for x in args.policies.split(",") if x.strip())
    unknown = [x for x in policies if x not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    slo = SLO(args.ttft_slo if args.ttft_slo is not None else cost.ttft_slo_s,
              args.tpot_slo if args.tpot_slo is not None else cost.tpot_slo_s)
    return SweepConfig(cost, policies, tuple(args.replicas), tuple(args.requests), stream, int(pd[0]), int(pd[1]),
                       args.per_node, tuple(args.loads), args.main_load, slo, args.target, args.seed,
                       feed_lag_s=args.feed_lag_s, stats_period_s=args.stats_period_s)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.save_trace is not None:
        stream = RequestStream(cfg.stream, cfg.requests[0], cfg.cost.chunk_tokens, cfg.seed)
        write_trace(args.save_trace, stream.trace(1.0))
        print(f"wrote {args.save_trace} (rate 1 req/s: replay with a time scale)")
    results = run(cfg)
    runtime = time.perf_counter() - started
    for res in results:
        print()
        print(table(res, cfg))
        print()
        print(sweep_table(res, cfg))
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": _commit(),
            "argv": sys.argv[1:] if argv is None else argv, "runtime_s": round(runtime, 1),
            "python": platform.python_version(), "machine": platform.machine()}
    doc = to_json(results, cfg, meta)
    write_json(args.out, doc)
    print(f"\nwrote {args.out} ({runtime:.0f} s)")
    try:
        for path in plots(doc, args.out.with_suffix("")):
            print(f"wrote {path}")
    except ImportError:
        print("matplotlib is not importable: no plots (the JSON has every point)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
