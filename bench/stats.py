"""Pure statistics for the benchmarks: per-request timings, percentiles, summaries, ratios.

Nothing here touches the network or the clock, so the unit tests pin the exact arithmetic
(tests/unit/test_bench_stats.py) and every benchmark reports figures computed the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestResult:
    """What the client saw for one streamed request; times are seconds since it was sent."""

    prompt_tokens: int
    ok: bool = True
    error: str = ""
    # One (time, n_tokens) entry per SSE chunk that carried output tokens. A chunk may carry
    # several tokens (pdserve's decode deltas, vLLM under load), so tokens are counted, not
    # chunks, and TPOT divides by tokens.
    token_events: list[tuple[float, int]] = field(default_factory=list)
    e2e_s: float = 0.0
    usage_completion_tokens: int | None = None  # the server's own count, when it sends usage
    output_ids: list[int] = field(default_factory=list)  # the tokens, when the server sends ids
    trace: dict[str, Any] = field(default_factory=dict)  # pdserve's routing trace, when it sends one
    sent_at: float = 0.0  # perf_counter() when the request went out (to replay arrivals)

    @property
    def n_out(self) -> int:
        return sum(n for _, n in self.token_events)

    @property
    def ttft_s(self) -> float | None:
        return self.token_events[0][0] if self.token_events else None

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.token_events)

    @property
    def max_gap_s(self) -> float | None:
        """Longest wait between two token-carrying chunks: the decode stall a user notices."""
        times = [t for t, _ in self.token_events]
        if len(times) < 2:
            return None
        return max(b - a for a, b in zip(times, times[1:], strict=False))


def tpot(token_events: Sequence[tuple[float, int]]) -> float | None:
    """Time per output token after the first: (t_last - t_first) / (n_out - 1).

    The first token's time is TTFT's business, so it is excluded; with one output token
    there is no TPOT (None, not 0, so it cannot drag a percentile down).
    """
    n_out = sum(n for _, n in token_events)
    if n_out < 2 or not token_events:
        return None
    return (token_events[-1][0] - token_events[0][0]) / (n_out - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks.

    Same definition as numpy's default (``method="linear"``), written out so bench/ needs no
    numpy and the tests can check it by hand. None for an empty input.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either side is missing or b is zero (no infinities in the JSON)."""
    if a is None or b is None or b == 0:
        return None
    return a / b
