"""Runs the matrix: for each cluster size, the same request stream at each rate of a sweep,
once per policy.

    size --> RequestStream (contents fixed by the seed) --> capacity estimate (cost model)
         --> rates = load factors x capacity
         --> for each rate, for each policy: a fresh SimCluster, the same requests

A policy that has dropped below the SLO target at some rate is not run at higher rates (it
would only fail harder, and the 512-replica runs are the expensive part), except at the
main load, which every policy runs for the side-by-side table.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.sim.capacity import Capacity, estimate
from bench.sim.cluster import ClusterSpec, SimCluster
from bench.sim.metrics import SLO, RequestRecord, RunSummary, summarize, ttft_cdf, window
from bench.sim.profiles import CostModel
from bench.sim.streams import RequestStream, StreamSpec
from bench.sim.workload import SimRequest


@dataclass(frozen=True)
class SweepConfig:
    cost: CostModel
    policies: tuple[str, ...]
    sizes: tuple[int, ...]
    requests: tuple[int, ...]  # per size
    stream: StreamSpec
    prefill_parts: int = 1
    decode_parts: int = 1
    per_node: int = 8
    loads: tuple[float, ...] = (0.7, 0.85, 1.0, 1.15, 1.3)  # rates as fractions of the capacity estimate
    main_load: float = 1.0
    slo: SLO = SLO(1.0, 0.05)
    target: float = 0.9  # SLO attainment the sweep looks for
    seed: int = 0
    warmup_frac: float = 0.25
    cooldown_frac: float = 0.05
    feed_lag_s: float = 0.0
    stats_period_s: float = 0.5  # Serve's request_routing_stats_period_s (cluster/app.py)

    def __post_init__(self) -> None:
        if len(self.requests) != len(self.sizes):
            raise ValueError(f"give one request count per size ({len(self.sizes)}), got {len(self.requests)}")


@dataclass(frozen=True)
class Knee:
    """Where a policy's SLO attainment first drops below the target, along the sweep."""

    rps: float  # interpolated offered rate at the target (or the end of the range tested)
    note: str  # "interpolated" | "above the highest rate tested" | "below the lowest rate tested"


@dataclass
class SizeResult:
    replicas: int
    n_prefill: int
    n_decode: int
    capacity: Capacity
    main: dict[str, RunSummary] = field(default_factory=dict)
    sweep: dict[str, dict[float, RunSummary]] = field(default_factory=dict)  # policy -> load -> run
    knees: dict[str, Knee] = field(default_factory=dict)
    cdf: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    wall_s: float = 0.0


def run_once(cfg: SweepConfig, spec: ClusterSpec, policy: str, requests: Sequence[SimRequest]
             ) -> tuple[RunSummary, list[RequestRecord], tuple[float, float]]:
    started = time.perf_counter()
    cluster = SimCluster(spec, cfg.cost, policy, cfg.seed)
    records = cluster.run(requests)
    wall = time.perf_counter() - started
    win = window([r.arrival_s for r in requests], cfg.warmup_frac, cfg.cooldown_frac)
    return summarize(policy, spec.replicas, records, cfg.slo, win, wall, cluster.decisions), records, win


def knee(points: Sequence[RunSummary], target: float) -> Knee:
    pts = sorted(points, key=lambda s: s.offered_rps)
    if not pts:
        return Knee(0.0, "not run")
    for i, p in enumerate(pts):
        if p.slo_attainment < target:
            if i == 0:
                return Knee(p.offered_rps, "below the lowest rate tested")
            a = pts[i - 1]
            frac = (a.slo_attainment - target) / max(a.slo_attainment - p.slo_attainment, 1e-12)
            return Knee(a.offered_rps + frac * (p.offered_rps - a.offered_rps), "interpolated")
    return Knee(pts[-1].offered_rps, "above the highest rate tested")


def run_size(cfg: SweepConfig, replicas: int, n_requests: int, log: Callable[[str], None]) -> SizeResult:
    started = time.perf_counter()
    spec = ClusterSpec(replicas, cfg.prefill_parts, cfg.decode_parts, cfg.per_node, cfg.stats_period_s,
                       feed_lag_s=cfg.feed_lag_s)
    roles = [role for _, _, role in spec.layout()]
    n_prefill, n_decode = roles.count("prefill"), roles.count("decode")
    stream = RequestStream(cfg.stream, n_requests, cfg.cost.chunk_tokens, cfg.seed)
    cap = estimate(stream.at_rate(1.0), cfg.cost, n_prefill, n_decode)
    out = SizeResult(replicas, n_prefill, n_decode, cap)
    log(f"[{replicas} replicas: {n_prefill} prefill + {n_decode} decode] capacity estimate {cap.rps:.1f} req/s "
        f"(prefill {cap.prefill_rps:.1f}, decode {cap.decode_rps:.1f}, ideal reuse {cap.reuse:.0%})")
    failed: set[str] = set()
    for load in sorted(set(cfg.loads) | {cfg.main_load}):
        requests = stream.at_rate(load * cap.rps)
        for policy in cfg.policies:
            if policy in failed and load != cfg.main_load:
                continue
            summary, records, win = run_once(cfg, spec, policy, requests)
            if load in cfg.loads:
                out.sweep.setdefault(policy, {})[load] = summary
            if load == cfg.main_load:
                out.main[policy] = summary
                out.cdf[policy] = ttft_cdf(records, win)
            if summary.slo_attainment < cfg.target:
                failed.add(policy)
            log(f"  load {load:.2f} ({summary.offered_rps:8.1f} req/s, {len(requests)} req) {policy:18s} "
                f"attain {summary.slo_attainment:6.1%} goodput {summary.goodput_rps:8.1f}  "
                f"ttft p90 {summary.ttft_p90_s * 1e3:7.0f} ms  [{summary.sim_wall_s:5.1f} s]")
    out.knees = {p: knee(list(out.sweep.get(p, {}).values()), cfg.target) for p in cfg.policies}
    out.wall_s = time.perf_counter() - started
    return out


def run(cfg: SweepConfig, log: Callable[[str], None] | None = None) -> list[SizeResult]:
    emit = log or (lambda line: print(line, file=sys.stderr, flush=True))
    return [run_size(cfg, size, n, emit) for size, n in zip(cfg.sizes, cfg.requests, strict=True)]
