"""pdserve 1 prefill + 1 decode replica against monolithic vLLM, on the same GPU, under load.

    python3 -m bench.gpu.serve --out $OUT/gpu-serve.json          (tools/gpu/run-tests.sh, SERVE_BENCH=1)

Both systems serve the same checkpoint with the same engine settings (bfloat16, block 32,
eager, max_model_len 2048, 64 sequences / 2048 tokens per step, vLLM's prefix cache on, a
fixed KV cache of ``--kv-gib`` per engine through ``kv_cache_memory_bytes``):

- monolithic: one ``vllm.entrypoints.openai.api_server`` (vLLM's own OpenAI server);
- pdserve: ``pdserve up`` (the real CLI, ``bench.servers.pdserve_system``), its prefill and
  decode replica each a 0.4 share of the one GPU in Ray.

Both come up at once (the engines' KV sizes are pinned, so vLLM's memory profiling cannot
race) and stay up; the runs then alternate, monolithic then pdserve for each workload and
rate, so only one system is loaded at a time and both see the same conditions. Workloads
(``bench.load.workloads``, prompts as token ids, ``ignore_eos``): ``random`` (no shared
prefix) and ``shared_prefix`` (a few long system prompts + a short question); each offered
as Poisson arrivals at each ``--rates`` for ``--duration-s`` (open loop:
``bench.load.driver``). Figures (``bench.load.report``): TTFT and TPOT p50/p99 and goodput
under the chat SLO (TTFT 1 s, 30 ms per output token, unscaled), and pdserve/monolithic
ratios. Raw JSON (every request) at ``--out``, the markdown tables on stdout and next to it.
Each run also samples every process's CPU for a second midway (``cpu_top``, psutil): which
process a system saturates first.

The model: ``tools/gpu/make_tiny_llama.py`` with seeded random bf16 weights, Llama-3.2-1B's
shape by default (16 layers, hidden 2048, 32 heads, 8 KV heads, FFN 8192; the trained
399-token tokenizer, so a tiny vocabulary), ``--shape tiny`` the GPU tests' 4 x 512 one.
Nothing here imports torch or vLLM: both run in their own processes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.load.driver import Pacing, records, run_sessions
from bench.load.report import SCENARIOS, prefix_hit_rate, summarize_run
from bench.load.workloads import Session, Shape, Turn, poisson_arrivals, random_workload, shared_prefix_workload
from bench.servers import Running, free_port, log_tail, pdserve_system, stop_session, wait_ready

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30
SHAPES = {  # make_tiny_llama.py arguments
    "1b": ["--layers", "16", "--hidden", "2048", "--heads", "32", "--kv-heads", "8"],
    "tiny": ["--layers", "4", "--hidden", "512", "--heads", "8", "--kv-heads", "4"],
}
WORKLOADS = {
    "random": Shape(input_len=512, output_len=64),
    "shared_prefix": Shape(input_len=64, output_len=64, system_prompts=4, system_len=1024),
}
SLO = SCENARIOS["chat"]  # GPU scale: TTFT 1 s, TPOT 30 ms
# The engine settings both systems share (pdserve's EngineConfig defaults, except dtype).
ENGINE: dict[str, str | int] = {"dtype": "bfloat16", "block_size": 32, "max_model_len": 2048, "max_num_seqs": 64,
          "max_num_batched_tokens": 2048}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--rates", default="4,16,32", help="offered requests/s, Poisson, comma list (rising)")
    p.add_argument("--duration-s", type=float, default=5.0, help="arrivals per run: rate x this (at least 12)")
    p.add_argument("--workloads", default="random,shared_prefix")
    p.add_argument("--kv-gib", type=float, default=8.0, help="KV cache per engine (kv_cache_memory_bytes)")
    p.add_argument("--gpu-mem", type=float, default=0.25, help="gpu_memory_utilization per engine (a start check)")
    p.add_argument("--chunk-tokens", type=int, default=128, help="pdserve's kvstore.chunk_tokens (1B: 4 MiB)")
    p.add_argument("--store-mb", type=int, default=4096, help="pdserve's store segment")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests per system first")
    p.add_argument("--timeout-s", type=float, default=20.0, help="per request")
    p.add_argument("--budget-s", type=float, default=270.0, help="whole run; later runs are skipped past it")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/pdgpu-bench"), help="model + server logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-interval", type=int, default=1,
                   help="output tokens per streamed message, on both sides (vLLM's --stream-interval)")
    p.add_argument("--router-replicas", type=int, default=1, help="pdserve's router replicas (router.replicas)")
    p.add_argument("--decode-stream", choices=("channel", "serve"), default="channel",
                   help="how pdserve's decoded tokens reach the router (router.decode_stream)")
    p.add_argument("--serve-transport", choices=("grpc", "ray"), default="grpc",
                   help="how Serve carries pdserve's calls: proxy -> router -> engines (router.serve_transport)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


# -- the model and its prompt vocabulary -------------------------------------------------


def make_model(shape: str, workdir: Path) -> Path:
    out = workdir / f"llama-{shape}-shape"
    if not (out / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(REPO / "tools/gpu/make_tiny_llama.py"), str(out), *SHAPES[shape],
                        "--vocab", "0", "--max-pos", "4096", "--weights-seed", "0", "--dtype", "bfloat16"],
                       check=True, timeout=300)
    return out


def prompt_vocab(model_dir: Path) -> list[int]:
    """The tokenizer's ordinary words when it has enough (bench.client), else every
    non-special id: the generated 399-token tokenizer has ~30 word-like tokens."""
    from bench.client import wordlike_vocab
    from router.tokenizer import PromptTokenizer

    try:
        return wordlike_vocab(model_dir)
    except RuntimeError:
        return list(range(4, PromptTokenizer(model_dir).vocab_size))  # 0-3: pad, bos, eos, unk


# -- monolithic vLLM on the GPU ----------------------------------------------------------


class _Mono:
    """vLLM's OpenAI server in its own session; started at once, awaited later, so it comes up
    while pdserve does."""

    def __init__(self, proc: subprocess.Popen[bytes], running: Running) -> None:
        self.proc, self.running, self.t0 = proc, running, time.monotonic()

    def wait_ready(self, model: str, timeout_s: float) -> Running:
        wait_ready(self.running.base_url, model, self.t0 + timeout_s, lambda: self.proc.poll() is None,
                    Path(self.running.log_path), "the vLLM server")
        self.running.startup_s = time.monotonic() - self.t0
        return self.running


@contextmanager
def monolithic_gpu(model_dir: Path, model: str, log_dir: Path, kv_bytes: int, gpu_mem: float,
                   stream_interval: int = 1) -> Iterator[_Mono]:
    port = free_port()
    log = log_dir / "monolithic.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", model, "--dtype", str(ENGINE["dtype"]), "--block-size", str(ENGINE["block_size"]),
           "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
           "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]), "--enforce-eager",
           "--enable-prefix-caching", "--gpu-memory-utilization", str(gpu_mem),
           "--kv-cache-memory-bytes", str(kv_bytes), "--stream-interval", str(stream_interval),
           "--seed", "0", "--port", str(port), "--host", "127.0.0.1"]
    out = log.open("w")
    out.write(" ".join(cmd) + "\n")
    out.flush()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    mono = _Mono(proc, Running("monolithic", f"http://127.0.0.1:{port}/v1", 0.0, str(log)))
    try:
        yield mono
    finally:
        mono.running.notes += stop_session(proc)
        out.close()
        for note in mono.running.notes:
            print(f"[serve] monolithic cleanup: {note}", file=sys.stderr, flush=True)


def pdserve_sets(a: argparse.Namespace, kv_bytes: int) -> list[str]:
    sets = ["device=cuda", f"kvstore.chunk_tokens={a.chunk_tokens}", f"kvstore.capacity_mb={a.store_mb}",
            f"router.replicas={a.router_replicas}", f"router.decode_stream={a.decode_stream}",
            f"router.serve_transport={a.serve_transport}",
            f"decode.engine.stream_interval={a.stream_interval}"]
    for pool in ("prefill", "decode"):
        sets += [f"{pool}.gpus_per_replica=0.4", f"{pool}.cpu_binding=[]",
                 f"{pool}.engine.gpu_memory_utilization={a.gpu_mem}",
                 f"{pool}.engine.kv_cache_memory_bytes={kv_bytes}", f"{pool}.engine.enable_prefix_caching=true",
                 f"{pool}.engine.enforce_eager=true"]
        sets += [f"{pool}.engine.{k}={v}" for k, v in ENGINE.items()]
    return sets


# -- runs --------------------------------------------------------------------------------


def sessions_for(workload: str, vocab: list[int], rate: float, duration_s: float, seed: int) -> list[Session]:
    """Fresh prompts per (workload, rate): no run finds an earlier run's prompts cached."""
    n = max(12, round(rate * duration_s))
    shape = replace(WORKLOADS[workload], requests=n)
    make = random_workload if workload == "random" else shared_prefix_workload
    s = make(vocab, shape, seed)
    return poisson_arrivals(s, rate, seed)


def warmup(url: str, model: str, vocab: list[int], n: int, seed: int) -> dict[str, Any]:
    """Unmeasured: CUDA kernels, the store segment's registration, Serve's routes."""
    base = random_workload(vocab, replace(WORKLOADS["random"], requests=n), seed)
    sessions = [Session([Turn(s.turns[0].new_tokens, 8)]) for s in base]
    sent, wall = asyncio.run(run_sessions(url, model, sessions, Pacing(False, 4, 60.0)))
    return summarize_run([s.result for s in sent], wall, [SLO])


def cpu_top(at_s: float, out: list[dict[str, Any]], n: int = 8) -> None:
    """At ``at_s`` into a run: the busiest processes over one second (psutil, in the device
    image), to see which one a system saturates first (a thread; no psutil: nothing)."""
    try:
        import psutil
    except ImportError:
        return
    time.sleep(at_s)
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            p.cpu_percent(None)
            procs.append(p)
        except psutil.Error:
            continue
    time.sleep(1.0)
    rows = []
    for p in procs:
        try:
            rows.append({"pid": p.pid, "cpu_pct": p.cpu_percent(None), "name": p.info["name"],
                         "cmd": " ".join(p.info["cmdline"] or [])[:120]})
        except psutil.Error:
            continue
    out += sorted(rows, key=lambda r: -r["cpu_pct"])[:n]


def one_run(url: str, model: str, sessions: list[Session], timeout_s: float) -> dict[str, Any]:
    top: list[dict[str, Any]] = []
    at = max(0.5, sessions[-1].arrival_s * 0.6) if sessions else 0.5
    sampler = threading.Thread(target=cpu_top, args=(at, top), daemon=True)
    sampler.start()
    sent, wall = asyncio.run(run_sessions(url, model, sessions, Pacing(True, 0, timeout_s)))
    sampler.join(timeout=5)
    results = [s.result for s in sent]
    summary = summarize_run(results, wall, [SLO])
    summary["cpu_top"] = top
    summary["prefix_hit_rate"] = prefix_hit_rate(results)
    summary["records"] = records(sent)
    return summary


RATIO_KEYS = {"ttft_p50": "ttft_p50_s", "ttft_p99": "ttft_p99_s", "tpot_p50": "tpot_p50_s",
              "tpot_p99": "tpot_p99_s"}


def ratios(pd: dict[str, Any], mono: dict[str, Any]) -> dict[str, float | None]:
    def r(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else round(a / b, 3)

    out = {k: r(pd.get(v), mono.get(v)) for k, v in RATIO_KEYS.items()}
    out["goodput"] = r(pd["goodput"][SLO.name]["requests_per_s"], mono["goodput"][SLO.name]["requests_per_s"])
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}" if x >= 0.01 else f"{x * 1e3:.1f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def tables(report: dict[str, Any]) -> str:
    lines = ["| workload | rate/s | system | req | TTFT p50 / p99 ms | TPOT p50 / p99 ms | goodput chat req/s "
             "(met) | out tok/s | failed |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for key, row in report["runs"].items():
        wl, rate = key.split("@")
        for system in ("monolithic", "pdserve"):
            s = row.get(system)
            if s is None:
                continue
            if "error" in s:
                lines.append(f"| {wl} | {rate} | {system} | error: {str(s['error'])[:100]} | | | | | |")
                continue
            g = s["goodput"][SLO.name]
            lines.append(f"| {wl} | {rate} | {system} | {s['requests']} | {_ms(s['ttft_p50_s'])} / "
                         f"{_ms(s['ttft_p99_s'])} | {_ms(s['tpot_p50_s'])} / {_ms(s['tpot_p99_s'])} | "
                         f"{g['requests_per_s'] or 0:.2f} ({g['attainment'] or 0:.0%}) | "
                         f"{s['output_tok_per_s'] or 0:.0f} | {s['failed']} |")
    for name, info in report.get("systems", {}).items():
        if "error" in info:
            lines.append(f"| - | - | {name} | did not come up: {str(info['error'])[:150]} | | | | | |")
    lines += ["", "pdserve / monolithic (below 1 is better for TTFT and TPOT, above 1 for goodput):", "",
              "| workload | rate/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | goodput |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for key, row in report["runs"].items():
        wl, rate = key.split("@")
        r = row.get("ratio")
        if r:
            lines.append(f"| {wl} | {rate} | {_x(r['ttft_p50'])} | {_x(r['ttft_p99'])} | {_x(r['tpot_p50'])} | "
                         f"{_x(r['tpot_p99'])} | {_x(r['goodput'])} |")
    return "\n".join(lines)


def save(report: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    report["table"] = tables(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(report["table"] + "\n")


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + a.budget_s
    a.workdir.mkdir(parents=True, exist_ok=True)
    log_dir = a.workdir / "logs"
    log_dir.mkdir(exist_ok=True)
    rates = [float(r) for r in a.rates.split(",")]
    workloads = [w for w in a.workloads.split(",") if w]
    kv_bytes = int(a.kv_gib * GIB)
    report: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "gpu": gpu_name(),
        "args": {k: str(v) for k, v in vars(a).items()}, "engine": ENGINE, "kv_cache_memory_bytes": kv_bytes,
        "slo": {"name": SLO.name, "ttft_s": SLO.ttft_s, "tpot_s": SLO.tpot_s},
        "workloads": {w: asdict(WORKLOADS[w]) for w in workloads}, "systems": {}, "runs": {}, "skipped": [],
    }
    t = time.monotonic()
    model_dir = make_model(a.shape, a.workdir)
    model = model_dir.name
    vocab = prompt_vocab(model_dir)
    report.update(model=str(model_dir), shape=a.shape, model_s=round(time.monotonic() - t, 1), vocab=len(vocab))
    print(f"[serve] model {model_dir} ({a.shape}) in {report['model_s']} s, {len(vocab)} prompt ids", flush=True)
    rc = 0
    try:
        with ExitStack() as stack:
            t = time.monotonic()
            mono = stack.enter_context(monolithic_gpu(model_dir, model, log_dir, kv_bytes, a.gpu_mem,
                                                      a.stream_interval))
            systems: dict[str, Running] = {}
            # `pdserve up` blocks until its engines answer; the vLLM server starts meanwhile.
            # One system that does not come up leaves the other's figures (and no ratios).
            try:
                systems["pdserve"] = stack.enter_context(
                    pdserve_system(model_dir, model, log_dir, pdserve_sets(a, kv_bytes), up_timeout_s=300.0))
            except Exception as e:
                report["systems"]["pdserve"] = {"error": f"{type(e).__name__}: {e}"[:4000]}
                print(f"[serve] pdserve did not come up: {e}", flush=True)
            try:
                systems["monolithic"] = mono.wait_ready(model, 300.0)
            except Exception as e:
                report["systems"]["monolithic"] = {"error": f"{type(e).__name__}: {e}"[:4000]}
                print(f"[serve] monolithic vLLM did not come up: {e}", flush=True)
            if not systems:
                raise RuntimeError("neither system came up")
            systems = {k: systems[k] for k in ("monolithic", "pdserve") if k in systems}
            report["both_up_s"] = round(time.monotonic() - t, 1)
            for name, run in systems.items():
                report["systems"][name] = {"base_url": run.base_url, "startup_s": round(run.startup_s, 1)}
                w = warmup(run.base_url, model, vocab, a.warmup, a.seed + 999)
                report["systems"][name]["warmup_failed"] = w["failed"]
                print(f"[serve] {name} up in {run.startup_s:.0f} s, warm-up {w['requests']} requests, "
                      f"{w['failed']} failed", flush=True)
            for wi, wl in enumerate(workloads):
                for ri, rate in enumerate(rates):
                    key = f"{wl}@{rate:g}"
                    seed = a.seed + 100 * wi + ri
                    est = 2 * (a.duration_s + 4) + 35  # both systems, drain, then teardown
                    if time.monotonic() + est > deadline:
                        report["skipped"].append(key)
                        print(f"[serve] {key}: skipped (budget)", flush=True)
                        continue
                    row: dict[str, Any] = {"rate": rate}
                    for name, run in systems.items():
                        try:
                            s = one_run(run.base_url, model, sessions_for(wl, vocab, rate, a.duration_s, seed),
                                        a.timeout_s)
                        except Exception as e:  # one broken run does not end the benchmark
                            s = {"error": f"{type(e).__name__}: {e}"}
                            traceback.print_exc()
                        row[name] = s
                        if "error" not in s:
                            print(f"[serve] {key} {name}: {s['requests']} req, {s['failed']} failed, "
                                  f"TTFT p50 {_ms(s['ttft_p50_s'])} ms, TPOT p50 {_ms(s['tpot_p50_s'])} ms, "
                                  f"goodput {s['goodput'][SLO.name]['requests_per_s'] or 0:.2f}/s, "
                                  f"wall {s['wall_s']} s", flush=True)
                            print("[serve]   busiest: " + ", ".join(
                                f"{p['name']}({p['cmd'][:60]}) {p['cpu_pct']:.0f}%" for p in s["cpu_top"][:4]),
                                flush=True)
                    if all(k in row and "error" not in row[k] for k in ("monolithic", "pdserve")):
                        row["ratio"] = ratios(row["pdserve"], row["monolithic"])
                    report["runs"][key] = row
                    save(report, a.out)  # so far: a run killed at its budget keeps what it has
            t = time.monotonic()
        report["teardown_s"] = round(time.monotonic() - t, 1)
    except (Exception, KeyboardInterrupt) as e:  # KeyboardInterrupt: run-tests.sh's timeout -s INT
        report["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        for f in sorted(log_dir.glob("*.log")):
            print(f"---- {f.name} (tail) ----\n{log_tail(f, 80)}", flush=True)
        rc = 1
    report["total_s"] = round(time.monotonic() - t_start, 1)
    report["table"] = tables(report)
    save(report, a.out)
    print(report["table"], flush=True)
    print(f"[serve] total {report['total_s']} s", flush=True)
    if any("error" in s for row in report["runs"].values() for s in row.values() if isinstance(s, dict)):
        rc = 1
    return rc


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
