"""Request streams for a run: the same requests (contents) at any arrival rate.

    multiturn  conversations from ``multiturn.conversations`` (one seed: identical contents at
               every rate), conversation starts Poisson at rate / mean turns
    trace      a Mooncake-format file, replayed with its timestamps scaled to the rate

Either can instead be re-timed as a plain Poisson process (``arrivals="poisson"``), which
drops the trace's timing (turn gaps, bursts) and keeps its order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from bench.sim.multiturn import Conversation, MultiTurnSpec, conversations, schedule
from bench.sim.workload import (
    MOONCAKE_TOKENS_PER_ID,
    KeyCache,
    SimRequest,
    TraceRequest,
    load_trace,
    poisson,
    to_requests,
)


@dataclass(frozen=True)
class StreamSpec:
    kind: str  # "multiturn" | "trace"
    trace_path: Path | None = None
    tokens_per_id: int = 512  # prompt tokens per hash id, as replayed
    trace_tokens_per_id: int = MOONCAKE_TOKENS_PER_ID  # ... as the trace file was written
    think_s: float = 0.5  # multiturn: exponential part of the gap between turns
    think_min_s: float = 0.25  # multiturn: fixed part of the gap
    arrivals: str = "trace"  # "trace" (the workload's own timing) | "poisson"

    def __post_init__(self) -> None:
        if self.kind not in ("multiturn", "trace"):
            raise ValueError(f"workload must be multiturn or trace, got {self.kind!r}")
        if self.kind == "trace" and self.trace_path is None:
            raise ValueError("a trace workload needs a file: --workload trace FILE")
        if self.arrivals not in ("trace", "poisson"):
            raise ValueError(f"arrivals must be trace or poisson, got {self.arrivals!r}")


class RequestStream:
    """``requests`` requests of one workload, ready to be timed at any rate."""

    def __init__(self, spec: StreamSpec, requests: int, chunk_tokens: int, seed: int) -> None:
        self.spec, self.chunk_tokens, self.seed = spec, chunk_tokens, seed
        self._keys: KeyCache = {}
        self._convs: list[Conversation] = []
        self._trace: list[TraceRequest] = []
        self._limit = requests
        if spec.kind == "multiturn":
            mt = MultiTurnSpec(conversations=requests, think_s=spec.think_s, think_min_s=spec.think_min_s,
                               tokens_per_id=spec.tokens_per_id)
            # as many conversations as requests: always enough for ``requests`` turns in the
            # steady-state window, however many the burn-in takes (``multiturn.schedule``)
            self._convs = conversations(mt, seed)
        else:
            assert spec.trace_path is not None
            self._trace = load_trace(spec.trace_path, limit=requests)
            if not self._trace:
                raise ValueError(f"{spec.trace_path}: no requests")

    def trace(self, rate: float) -> list[TraceRequest]:
        """The stream at ``rate`` as Mooncake-format lines (to save, or to replay for real)."""
        if self.spec.kind == "multiturn":
            return schedule(self._convs, rate, self.seed, self._limit)
        scale = self._trace_rate() / rate
        return [replace(r, timestamp_ms=r.timestamp_ms * scale) for r in self._trace]

    def _trace_rate(self) -> float:
        ts = sorted(r.timestamp_ms for r in self._trace)
        span_s = (ts[-1] - ts[0]) / 1000.0
        return (len(ts) - 1) / span_s if span_s > 0 else 1.0

    def at_rate(self, rate: float) -> list[SimRequest]:
        sp = self.spec
        if sp.kind == "multiturn":
            reqs = to_requests(schedule(self._convs, rate, self.seed, self._limit), sp.tokens_per_id,
                               self.chunk_tokens, cache=self._keys)
        else:
            base = to_requests(self._trace, sp.tokens_per_id, self.chunk_tokens,
                               trace_tokens_per_id=sp.trace_tokens_per_id, cache=self._keys)
            scale = self._trace_rate() / rate
            reqs = [replace(r, arrival_s=r.arrival_s * scale) for r in base]
        return poisson(reqs, rate, self.seed) if self.spec.arrivals == "poisson" else reqs
