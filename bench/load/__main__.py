"""``pdserve bench``: load any OpenAI-compatible endpoint with a workload and report TTFT,
TPOT, ITL and end-to-end percentiles, throughput and goodput under SLOs.

    pdserve bench --workload multiturn --rate 0.5,1,2 --slo chat
    pdserve bench --url http://host:8000/v1 --workload trace --trace mooncake.jsonl --time-scale 0.1
    pdserve bench --workload random --concurrency 4 --requests 64

Without ``--url`` it loads the pdserve cluster that ``pdserve up`` started here. Each
``--rate`` (sessions per second, Poisson arrivals) is one run; ``--concurrency`` runs a
closed loop instead. Results: a markdown table on stdout, JSON (every figure and every
request) at ``--out``, and next to it PNG plots: latency CDFs and, with several rates,
goodput against the offered rate.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx

from bench.load.driver import Pacing, records, run_sessions
from bench.load.report import SCENARIOS, Slo, markdown, summarize_run
from bench.load.workloads import (
    Session,
    Shape,
    TraceScale,
    multiturn_workload,
    poisson_arrivals,
    random_workload,
    shared_prefix_workload,
    trace_workload,
)

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = ("random", "shared_prefix", "multiturn", "trace")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pdserve bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", help="OpenAI base URL (…/v1); default: the pdserve cluster started here")
    p.add_argument("--model", help="model name to send; default: the server's first /v1/models entry")
    p.add_argument("--tokenizer", help="checkpoint dir whose vocabulary the prompts are drawn from "
                   "(default: pdserve's default model)")
    p.add_argument("--workload", choices=WORKLOADS, default="multiturn")
    p.add_argument("--requests", type=int, default=32, help="sessions (conversations for multiturn)")
    p.add_argument("--input-len", type=int, default=128, help="tokens per prompt (random) or question")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--system-len", type=int, default=512, help="tokens per shared system prompt")
    p.add_argument("--system-prompts", type=int, default=2)
    p.add_argument("--turns", type=int, default=4, help="turns per conversation (multiturn)")
    p.add_argument("--trace", type=Path, help="Mooncake-format JSONL (workload trace)")
    p.add_argument("--tokens-per-id", type=int, default=16, help="trace: prompt tokens per hash id")
    p.add_argument("--max-output", type=int, default=64, help="trace: cap on scaled output tokens")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace: arrival gaps times this")
    p.add_argument("--limit", type=int, default=0, help="trace: first N requests (0 = all)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", default=None, help="open loop: sessions/s, Poisson; a comma list runs each")
    pace.add_argument("--concurrency", type=int, default=None, help="closed loop: sessions in flight")
    p.add_argument("--slo", default="chat", help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--slo-scale", type=float, default=10.0, help="stretch the SLO bounds (CPU: 10)")
    p.add_argument("--ttft-slo", type=float, help="custom SLO: TTFT bound, s (with --tpot-slo/--e2e-slo)")
    p.add_argument("--tpot-slo", type=float)
    p.add_argument("--e2e-slo", type=float)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    return p.parse_args(argv)


def slos(args: argparse.Namespace) -> list[Slo]:
    out = []
    for name in filter(None, (args.slo or "").split(",")):
        if name not in SCENARIOS:
            raise SystemExit(f"unknown SLO {name!r}: one of {', '.join(SCENARIOS)}")
        out.append(SCENARIOS[name].scaled(args.slo_scale))
    if args.ttft_slo or args.tpot_slo or args.e2e_slo:
        out.append(Slo("custom", args.ttft_slo, args.tpot_slo, args.e2e_slo))
    return out


def build(args: argparse.Namespace, vocab: list[int]) -> list[Session]:
    shape = Shape(requests=args.requests, input_len=args.input_len, output_len=args.output_len,
                  system_prompts=args.system_prompts, system_len=args.system_len, turns=args.turns)
    if args.workload == "trace":
        if args.trace is None:
            raise SystemExit("--workload trace needs --trace FILE")
        scale = TraceScale(args.tokens_per_id, args.max_output, args.time_scale, args.limit)
        return trace_workload(vocab, args.trace, scale, args.seed)
    make = {"random": random_workload, "shared_prefix": shared_prefix_workload,
            "multiturn": multiturn_workload}[args.workload]
    return make(vocab, shape, args.seed)


def runs(args: argparse.Namespace) -> list[tuple[str, Pacing, float | None]]:
    """(name, pacing, Poisson rate or None for the workload's own arrival times)."""
    if args.concurrency:
        return [(f"concurrency {args.concurrency}", Pacing(False, args.concurrency, args.timeout), None)]
    if args.rate:
        return [(f"rate {r}/s", Pacing(True, 0, args.timeout), float(r)) for r in args.rate.split(",")]
    if args.workload == "trace":
        return [(f"trace x{args.time_scale}", Pacing(True, 0, args.timeout), None)]
    return [("concurrency 4", Pacing(False, 4, args.timeout), None)]


def resolve_target(args: argparse.Namespace) -> tuple[str, str]:
    url = args.url
    if url is None:
        from cluster.runtime import RunState

        state = RunState.load()
        if state is None or not state.url:
            raise SystemExit("no --url and no pdserve cluster up here (pdserve up, or pass --url)")
        url = state.url
    model = args.model
    if model is None:
        listed = httpx.get(url.rstrip("/") + "/models", timeout=30).json()
        model = listed["data"][0]["id"]
    return url, model


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """Next to the JSON: TTFT and TPOT CDFs, one line per run, and with several rates,
    goodput against the offered rate, one line per SLO."""
    from bench.plots import latency_cdfs, lines

    runs = report["runs"]
    panels = {metric: {name: [r[f"{metric}_s"] for r in run["records"] if r["ok"] and r[f"{metric}_s"] is not None]
                       for name, run in runs.items()} for metric in ("ttft", "tpot")}
    files = [latency_cdfs({"TTFT": panels["ttft"], "TPOT": panels["tpot"]},
                          out.with_name(out.stem + "-latency-cdf.png"), "ms")]
    rated = {name: run for name, run in runs.items() if run.get("offered_sessions_per_s") is not None}
    if len(rated) > 1:
        slos = sorted({slo for run in rated.values() for slo in run["goodput"]})
        series = {slo: [(run["offered_sessions_per_s"], run["goodput"][slo]["requests_per_s"] or 0.0)
                        for run in rated.values()] for slo in slos}
        files.append(lines(series, out.with_name(out.stem + "-goodput-vs-rate.png"), "offered sessions/s",
                           "requests/s within the SLO", "goodput against the offered rate"))
    return [str(f) for f in files]


def main(argv: list[str] | None = None) -> int:
    from bench.client import wordlike_vocab
    from cluster.model import prepare_default_model

    args = parse_args(argv)
    url, model = resolve_target(args)
    vocab = wordlike_vocab(Path(args.tokenizer) if args.tokenizer else prepare_default_model())
    targets = slos(args)
    report: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),
        "url": url, "model": model, "args": {k: str(v) for k, v in vars(args).items()}, "runs": {},
    }
    for name, pacing, rate in runs(args):
        sessions = build(args, vocab)
        if rate is not None:
            poisson_arrivals(sessions, rate, args.seed)
        sent, wall = asyncio.run(run_sessions(url, model, sessions, pacing))
        summary = summarize_run([s.result for s in sent], wall, targets)
        summary["offered_sessions_per_s"] = rate
        summary["records"] = records(sent)
        report["runs"][name] = summary
        print(f"[bench] {name}: {summary['requests']} requests, {summary['failed']} failed, "
              f"{wall:.1f} s", flush=True)
    table = markdown({k: {kk: vv for kk, vv in v.items() if kk != "records"} for k, v in report["runs"].items()})
    report["table"] = table
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            report["plots"] = plot(report, args.out)
        except ImportError as e:  # matplotlib comes with pdserve's test/bench extras
            report["plots"] = []
            print(f"[bench] no plots: {e}")
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table)
    failed = sum(r["failed"] for r in report["runs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
