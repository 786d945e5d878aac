"""Per-request results of a run and their summary: latency percentiles, where prompt tokens
came from, SLO attainment and goodput.

Percentiles use ``bench.stats.percentile`` (numpy's linear method) so the simulator and the
real benchmarks compute figures the same way. TPOT is the client's view, (last token - first
token) / (output tokens - 1): it includes the decode replica's queue and KV load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.stats import percentile


@dataclass(frozen=True)
class RequestRecord:
    rid: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float | None  # None with a single output token
    own_tokens: int  # prompt tokens from the prefill replica's own cache
    node_tokens: int  # ... loaded from the store on its node
    remote_tokens: int  # ... loaded from the store on another node
    compute_tokens: int  # ... computed
    prefill_replica: str
    decode_replica: str  # "" without a decode phase
    decode_same_node: bool  # the decode replica is on the prefill replica's node


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def met(self, r: RequestRecord) -> bool:
        return r.ttft_s <= self.ttft_s and (r.tpot_s is None or r.tpot_s <= self.tpot_s)


@dataclass(frozen=True)
class RunSummary:
    policy: str
    replicas: int
    offered_rps: float  # arrivals per second in the measured window
    requests: int  # measured (arrived inside the window)
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    hit_own: float  # fractions of measured prompt tokens, by where they came from
    hit_store_node: float
    hit_store_remote: float
    computed: float
    decode_same_node: float  # fraction of decodes on the prefill replica's node
    slo_attainment: float
    goodput_rps: float  # measured requests meeting both SLOs per second of the window
    sim_wall_s: float  # host seconds the run took
    decisions_per_s: float  # routing decisions per host second (the real policy code's speed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window(arrivals: Sequence[float], warmup_frac: float, cooldown_frac: float) -> tuple[float, float]:
    """The measured arrival window: the run's arrivals less the first ``warmup_frac`` of them
    (cold caches, conversations still starting) and the last ``cooldown_frac`` (conversations
    ending, load falling off). Counted in requests, not seconds: a few late turns after long
    pauses would stretch a window in seconds far into the tail."""
    xs = sorted(arrivals)
    if not xs:
        return 0.0, 0.0
    n = len(xs)
    lo = min(int(warmup_frac * n), n - 1)
    hi = max(lo, n - 1 - int(cooldown_frac * n))
    return xs[lo], xs[hi]


def _p(xs: Sequence[float], q: float) -> float:
    v = percentile(xs, q)
    return float("nan") if v is None else v


def summarize(policy: str, replicas: int, records: Sequence[RequestRecord], slo: SLO, win: tuple[float, float],
              sim_wall_s: float, decisions: int) -> RunSummary:
    lo, hi = win
    measured = [r for r in records if lo <= r.arrival_s <= hi]
    length = max(hi - lo, 1e-9)
    ttfts = [r.ttft_s for r in measured]
    tpots = [r.tpot_s for r in measured if r.tpot_s is not None]
    prompt = max(sum(r.prompt_tokens for r in measured), 1)
    decoded = [r for r in measured if r.decode_replica]
    met = sum(1 for r in measured if slo.met(r))
    return RunSummary(
        policy=policy, replicas=replicas, offered_rps=len(measured) / length, requests=len(measured),
        ttft_p50_s=_p(ttfts, 50), ttft_p90_s=_p(ttfts, 90), ttft_p99_s=_p(ttfts, 99),
        tpot_p50_s=_p(tpots, 50), tpot_p90_s=_p(tpots, 90),
        hit_own=sum(r.own_tokens for r in measured) / prompt,
        hit_store_node=sum(r.node_tokens for r in measured) / prompt,
        hit_store_remote=sum(r.remote_tokens for r in measured) / prompt,
        computed=sum(r.compute_tokens for r in measured) / prompt,
        decode_same_node=sum(1 for r in decoded if r.decode_same_node) / max(len(decoded), 1),
        slo_attainment=met / max(len(measured), 1), goodput_rps=met / length,
        sim_wall_s=sim_wall_s, decisions_per_s=decisions / max(sim_wall_s, 1e-9),
    )


def ttft_cdf(records: Sequence[RequestRecord], win: tuple[float, float],
             points: int = 200) -> list[tuple[float, float]]:
    """(ttft, fraction of measured requests at or below it), ``points`` points for a plot."""
    xs = sorted(r.ttft_s for r in records if win[0] <= r.arrival_s <= win[1])
    if not xs:
        return []
    step = max(1, len(xs) // points)
    return [(xs[i], (i + 1) / len(xs)) for i in range(0, len(xs), step)] + [(xs[-1], 1.0)]
