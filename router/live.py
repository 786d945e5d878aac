"""What the dashboard (``GET /dashboard``) and ``pdserve status`` show, as one JSON-ready
snapshot: each pool's replicas, the store, and the latencies of recent requests.

Sources, all in the router process already:

    replicas   each pool's request router: Serve's latest routing stats per replica,
               refreshed in the background between requests too (``RoutingState.pool_loads``)
    rates      the replicas' cumulative counters (busy seconds, prompt tokens computed,
               tokens generated), differenced between snapshots (``CounterRates``)
    store      ``kvstore.stats.collect``: per-node fill, and the byte counters per transport
    requests   ``RequestLog``: TTFT and TPOT of the requests this router replica served

A replica's utilization is the fraction of the last interval it had a request in flight
(the rate of its busy seconds): the number an operator scales a pool on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.messages import ReplicaLoad
from kvstore.stats import StoreStats

RATE_WINDOW_S = 60.0  # requests per second and tokens per second: over the last minute


@dataclass(frozen=True)
class Served:
    done_at: float  # time.monotonic()
    ttft_s: float
    tpot_s: float | None  # None for one-token answers
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


def percentiles(xs: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
    s = sorted(xs)
    return {f"p{q}": (s[min(len(s) - 1, q * len(s) // 100)] if s else None) for q in qs}


TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    """A cumulative histogram, Prometheus style (upper bounds, plus +Inf)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, x: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if x <= b), len(self.bounds))] += 1
        self.sum += x
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, observations at or below it) per bucket, ending with +Inf."""
        out, running = [], 0
        for le, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


class RequestLog:
    """The last requests this router served (bounded by count and age), and totals since
    the router started (Prometheus counters and histograms)."""

    def __init__(self, window_s: float = 300.0, max_requests: int = 5000) -> None:
        self.window_s = window_s
        self._served: deque[Served] = deque(maxlen=max_requests)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.totals = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "output_tokens": 0}
        # What went wrong on the way, and what was done about it (router/metrics.py).
        self.faults = {"rejected": 0, "prefill_retries": 0, "decode_resumes": 0, "failed": 0, "timed_out": 0}

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] += n

    def record(self, ttft_s: float, tpot_s: float | None, prompt_tokens: int, cached_tokens: int,
               output_tokens: int, now: float | None = None) -> None:
        self._served.append(Served(time.monotonic() if now is None else now, ttft_s, tpot_s,
                                   prompt_tokens, cached_tokens, output_tokens))
        self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        for key, n in (("requests", 1), ("prompt_tokens", prompt_tokens), ("cached_tokens", cached_tokens),
                       ("output_tokens", output_tokens)):
            self.totals[key] += n

    def summary(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        while self._served and now - self._served[0].done_at > self.window_s:
            self._served.popleft()
        recent = list(self._served)
        last_minute = [r for r in recent if now - r.done_at <= RATE_WINDOW_S]
        span = min(RATE_WINDOW_S, max(now - recent[0].done_at, 1.0)) if recent else RATE_WINDOW_S
        prompt = sum(r.prompt_tokens for r in recent)
        return {
            "window_s": self.window_s, "requests": len(recent),
            "ttft_s": percentiles([r.ttft_s for r in recent]),
            "tpot_s": percentiles([r.tpot_s for r in recent if r.tpot_s is not None]),
            "requests_per_s": len(last_minute) / span,
            "output_tokens_per_s": sum(r.output_tokens for r in last_minute) / span,
            "prefix_hit_rate": sum(r.cached_tokens for r in recent) / prompt if prompt else None,
        }


class CounterRates:
    """Rates of cumulative counters between snapshots at least ``min_interval_s`` apart (a
    faster poll reuses the last rate, so two dashboards polling do not shorten the interval
    to noise). A counter that went down (its replica restarted) starts over."""

    def __init__(self, min_interval_s: float = 1.0) -> None:
        self.min_interval_s = min_interval_s
        self._last: dict[str, tuple[float, float]] = {}  # key -> (time, value) of the last sample
        self._rate: dict[str, float] = {}

    def rate(self, key: str, value: float, now: float) -> float | None:
        last = self._last.get(key)
        if last is None or value < last[1]:
            self._last[key] = (now, value)
            self._rate.pop(key, None)
            return None
        if now - last[0] >= self.min_interval_s:
            self._rate[key] = (value - last[1]) / (now - last[0])
            self._last[key] = (now, value)
        return self._rate.get(key)

    def forget_except(self, live: set[str]) -> None:
        for key in [k for k in self._last if k.split("/", 1)[0] not in live]:
            del self._last[key]
            self._rate.pop(key, None)


def replica_row(load: ReplicaLoad, rates: CounterRates, now: float) -> dict[str, Any]:
    key = load.replica
    busy = rates.rate(f"{key}/busy_s", load.busy_s, now)
    return {
        "replica": load.replica, "node": load.node_id, "running": load.running, "waiting": load.waiting,
        "inflight": load.inflight, "kv_usage": load.kv_usage, "queued_tokens": load.queued_tokens,
        "utilization": None if busy is None else min(max(busy, 0.0), 1.0),
        "prefill_tokens_per_s": rates.rate(f"{key}/computed", load.computed_tokens, now),
        "output_tokens_per_s": rates.rate(f"{key}/generated", load.generated_tokens, now),
        "prefix_hit_rate": load.cached_tokens / load.prompt_tokens if load.prompt_tokens else None,
        "totals": {"busy_s": load.busy_s, "computed_tokens": load.computed_tokens, "prompt_tokens": load.prompt_tokens,
                   "cached_tokens": load.cached_tokens, "generated_tokens": load.generated_tokens},
    }


def store_view(stats: StoreStats | None, rates: CounterRates, now: float) -> dict[str, Any]:
    if stats is None:
        return {"available": False}
    nodes = {}
    for node, s in sorted(stats.nodes.items()):
        cap, used = s.get("capacity", 0), s.get("used_bytes", 0)
        nodes[node] = {"reachable": not s.get("unreachable"), "capacity_bytes": cap, "used_bytes": used,
                       "fill": used / cap if cap else None, "chunks": s.get("chunks", 0),
                       "evicted": s.get("evicted", 0)}
    totals = stats.totals
    transfer = {}
    for name, value in sorted(totals.items()):
        if name.startswith(("bytes_in_", "bytes_out_")):
            transfer[name] = rates.rate(f"store/{name}", value, now)
    hits, misses = totals.get("lookup_hit_chunks", 0), totals.get("lookup_miss_chunks", 0)
    return {"available": True, "nodes": nodes, "bytes_per_s": transfer,
            "lookup_hit_rate": hits / (hits + misses) if hits + misses else None}


def snapshot(pools: Mapping[str, Sequence[ReplicaLoad]], store: StoreStats | None, requests: RequestLog,
             rates: CounterRates, now: float | None = None) -> dict[str, Any]:
    now = time.monotonic() if now is None else now
    rows = {role: sorted((replica_row(load, rates, now) for load in loads), key=lambda r: r["replica"])
            for role, loads in sorted(pools.items())}
    rates.forget_except({r["replica"] for pool in rows.values() for r in pool} | {"store"})
    return {"time": time.time(), "pools": rows, "store": store_view(store, rates, now),
            "requests": requests.summary(now)}
