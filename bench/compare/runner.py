"""One system under test: start it, warm it, send it each workload, summarize, stop it.

A system that fails keeps the run going: its entry says why, and a workload in which every
request failed ends that system's turn (a dead engine would otherwise cost every later
request its whole timeout).
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from bench.compare.plan import Plan
from bench.load.driver import Pacing, Sent, records, run_sessions
from bench.load.report import Slo, prefix_hit_rate, summarize_run
from bench.load.workloads import Session, Turn, random_workload
from bench.servers import Running, SystemStartError


def checks(sent: Sequence[Sent], sessions: Sequence[Session]) -> list[str]:
    """ignore_eos: every answer is exactly as long as asked, and our count matches the
    server's own usage figure. A mismatch is a harness or server bug, named in the report."""
    want = {(i, j): t.max_tokens for i, s in enumerate(sessions) for j, t in enumerate(s.turns)}
    notes = []
    short = [(s.result.n_out, want[(s.session, s.turn)]) for s in sent
             if s.result.ok and s.result.n_out != want[(s.session, s.turn)]]
    if short:
        notes.append(f"{len(short)} answer(s) of another length than asked (got, asked): {short[:6]}")
    off = [(s.result.n_out, s.result.usage_completion_tokens) for s in sent
           if s.result.ok and s.result.usage_completion_tokens not in (None, s.result.n_out)]
    if off:
        notes.append(f"counted tokens differ from usage.completion_tokens: {off[:6]}")
    return notes


def warmup_sessions(plan: Plan, vocab: Sequence[int], seed: int) -> list[Session]:
    """Random prompts of the random workload's shape from a seed no workload uses, so the
    warm-up fills no prefix cache that a measured request could hit."""
    sessions = random_workload(vocab, plan.shapes["random"], seed - 1)[: plan.warmup]
    return [Session([Turn(s.turns[0].new_tokens, 2)]) for s in sessions]


def run_workload(base_url: str, model: str, sessions: list[Session], plan: Plan,
                 slos: Sequence[Slo]) -> dict[str, Any]:
    sent, wall = asyncio.run(run_sessions(base_url, model, sessions, Pacing(False, plan.concurrency, plan.timeout_s)))
    summary = summarize_run([s.result for s in sent], wall, slos)
    summary["prefix_hit_rate"] = prefix_hit_rate([s.result for s in sent])
    summary["checks"] = checks(sent, sessions)
    return {"summary": summary, "records": records(sent)}


def bench_system(name: str, ctx: AbstractContextManager[Running], model: str, vocab: Sequence[int],
                 plan: Plan, slos: Sequence[Slo], seed: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"system": name, "workloads": {}}
    t0 = time.monotonic()
    running: Running | None = None
    try:
        with ctx as running:
            entry.update(base_url=running.base_url, startup_s=round(running.startup_s, 1), log=running.log_path)
            print(f"[compare] {name} up in {running.startup_s:.0f} s at {running.base_url}", flush=True)
            if plan.warmup:
                w = run_workload(running.base_url, model, warmup_sessions(plan, vocab, seed), plan, slos)
                if w["summary"]["failed"]:
                    raise SystemStartError(f"warm-up failed: {w['summary']['errors']}")
            for workload in plan.workloads_for(name):
                t = time.monotonic()
                done = run_workload(running.base_url, model, plan.sessions(workload, vocab, seed), plan, slos)
                entry["workloads"][workload] = done
                s = done["summary"]
                print(f"[compare] {name} {workload}: {s['requests']} requests, {s['failed']} failed, "
                      f"{time.monotonic() - t:.0f} s", flush=True)
                if s["failed"] == s["requests"]:
                    entry["error"] = f"every {workload} request failed: {s['errors']}"
                    break
    except Exception as e:
        entry["error"] = f"{type(e).__name__}: {e}"
        print(f"[compare] {name} FAILED:\n{entry['error']}", file=sys.stderr, flush=True)
        if not isinstance(e, SystemStartError):
            traceback.print_exc()
    if running is not None:
        entry["cleanup_notes"] = running.notes  # filled in by the context manager's exit
    entry["total_s"] = round(time.monotonic() - t0, 1)
    return entry
