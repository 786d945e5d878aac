"""Send a workload to any OpenAI-compatible ``/v1/completions`` and time every token.

Two ways to pace it:

- open loop: each session starts at its arrival time (Poisson, or a trace's timestamps),
  whatever is still in flight: the server's queue grows when it falls behind, as in
  production, and latency shows it;
- closed loop: ``concurrency`` sessions at a time, the next one starting when one ends: the
  server's throughput at that concurrency.

Either way a session's turns go one after another, each prompt the history so far plus the
turn's new tokens, the history growing by the model's own answer (its token ids).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.client import Prompt, request_body, stream_one
from bench.load.workloads import Session
from bench.stats import RequestResult


@dataclass
class Sent:
    session: int
    turn: int
    result: RequestResult
    sent_s: float  # from the run's start


def records(sent: Sequence[Sent]) -> list[dict[str, Any]]:
    """Every request as the JSON reports keep it (pdserve's routing fields where it sent them)."""
    return [{"session": s.session, "turn": s.turn, "sent_s": round(s.sent_s, 4),
             "prompt_tokens": s.result.prompt_tokens, "output_tokens": s.result.n_out,
             "usage_completion_tokens": s.result.usage_completion_tokens,
             "ttft_s": s.result.ttft_s, "tpot_s": s.result.tpot_s, "e2e_s": s.result.e2e_s,
             "max_gap_s": s.result.max_gap_s, "ok": s.result.ok, "error": s.result.error or None,
             "cached_tokens": s.result.trace.get("prefill_cached_tokens"),
             "prefill_replica": s.result.trace.get("prefill_replica")} for s in sent]


@dataclass(frozen=True)
class Pacing:
    open_loop: bool = True  # sessions at their arrival times; False: ``concurrency`` at a time
    concurrency: int = 4
    timeout_s: float = 600.0


async def run_sessions(base_url: str, model: str, sessions: list[Session], pacing: Pacing) -> tuple[list[Sent], float]:
    """Every session's turns, paced as asked; returns what was sent (in send order) and the
    wall time from the run's start to the last byte."""
    url = base_url.rstrip("/") + "/completions"
    sent: list[Sent] = []
    gate = asyncio.Semaphore(max(1, pacing.concurrency)) if not pacing.open_loop else None
    # Open loop may have every session in flight at once: no pool limit stands in for the server's queue.
    limits = httpx.Limits(max_connections=None if gate is None else pacing.concurrency, max_keepalive_connections=64)

    async def session(client: httpx.AsyncClient, i: int, s: Session, t0: float) -> None:
        if gate is None:
            await asyncio.sleep(max(0.0, t0 + s.arrival_s - time.perf_counter()))
            await turns(client, i, s, t0)
        else:
            async with gate:
                await turns(client, i, s, t0)

    async def turns(client: httpx.AsyncClient, i: int, s: Session, t0: float) -> None:
        history: list[int] = []
        for j, turn in enumerate(s.turns):
            history += turn.new_tokens
            started = time.perf_counter() - t0
            res = await stream_one(client, url, request_body(model, Prompt(list(history), turn.max_tokens)),
                                   pacing.timeout_s)
            sent.append(Sent(i, j, res, started))
            if not res.ok:
                return  # the rest of the conversation depends on this answer
            history += res.output_ids

    async with httpx.AsyncClient(limits=limits, timeout=pacing.timeout_s) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(session(client, i, s, t0) for i, s in enumerate(sessions)))
        wall = time.perf_counter() - t0
    sent.sort(key=lambda x: x.sent_s)
    return sent, wall
