"""The dashboard's numbers (router/live.py) and their text form (cluster/status.py)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.status import render
from kvstore.messages import ReplicaLoad
from kvstore.stats import StoreStats
from router.live import CounterRates, RequestLog, percentiles, snapshot
from router.metrics import render_pools, render_requests


def test_request_log_percentiles_rates_and_window() -> None:
    log = RequestLog(window_s=100.0)
    for i in range(10):  # one request a second, TTFT 0.1 .. 1.0 s, 5 tokens each
        log.record(0.1 * (i + 1), 0.02, prompt_tokens=100, cached_tokens=60, output_tokens=5, now=float(i))
    log.record(0.5, None, prompt_tokens=100, cached_tokens=0, output_tokens=1, now=9.5)  # one-token answer
    s = log.summary(now=10.0)
    assert s["requests"] == 11 and s["ttft_s"]["p50"] == pytest.approx(0.5)
    assert s["tpot_s"] == {"p50": 0.02, "p90": 0.02, "p99": 0.02}  # the one-token answer has none
    assert s["requests_per_s"] == pytest.approx(11 / 10) and s["output_tokens_per_s"] == pytest.approx(51 / 10)
    assert s["prefix_hit_rate"] == pytest.approx(600 / 1100)
    assert log.summary(now=150.0)["requests"] == 0  # all older than the window
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_counter_rates_need_an_interval_and_restart_with_the_replica() -> None:
    r = CounterRates(min_interval_s=1.0)
    assert r.rate("a/x", 100, now=0.0) is None  # first sight
    assert r.rate("a/x", 150, now=0.5) is None  # too soon: no rate yet
    assert r.rate("a/x", 300, now=2.0) == pytest.approx(100.0)
    assert r.rate("a/x", 310, now=2.5) == pytest.approx(100.0)  # too soon: the last rate
    assert r.rate("a/x", 5, now=4.0) is None  # went down: the replica restarted
    r.forget_except({"b"})
    assert r.rate("a/x", 50, now=5.0) is None


def test_snapshot_and_status_text() -> None:
    rates, log = CounterRates(min_interval_s=1.0), RequestLog()
    log.record(0.25, 0.05, 400, 320, 9, now=0.0)

    def loads(t: float) -> dict[str, list[ReplicaLoad]]:
        return {
            "prefill": [ReplicaLoad("p1", "node-a", running=1, busy_s=0.5 * t, computed_tokens=int(300 * t),
                                    prompt_tokens=400, cached_tokens=320)],
            "decode": [ReplicaLoad("d1", "node-b", running=3, kv_usage=0.4, busy_s=t, generated_tokens=int(20 * t))],
        }

    store = StoreStats(totals={"bytes_in_shm": 0, "lookup_hit_chunks": 3, "lookup_miss_chunks": 1},
                       nodes={"node-a": {"capacity": 1000, "used_bytes": 250, "chunks": 7, "evicted": 2}})
    snapshot(loads(0.0), store, log, rates, now=0.0)
    store.totals["bytes_in_shm"] = 4_000_000
    snap = snapshot(loads(2.0), store, log, rates, now=2.0)
    p, d = snap["pools"]["prefill"][0], snap["pools"]["decode"][0]
    assert p["utilization"] == pytest.approx(0.5) and p["prefill_tokens_per_s"] == pytest.approx(300)
    assert p["prefix_hit_rate"] == pytest.approx(0.8)
    assert d["utilization"] == pytest.approx(1.0) and d["output_tokens_per_s"] == pytest.approx(20)
    assert snap["store"]["nodes"]["node-a"]["fill"] == pytest.approx(0.25)
    assert snap["store"]["bytes_per_s"]["bytes_in_shm"] == pytest.approx(2e6)
    assert snap["store"]["lookup_hit_rate"] == pytest.approx(0.75)
    text = render(snap, {"prefill": {"status": "HEALTHY", "replicas": {"RUNNING": 1}}})
    for expected in ("p1", "d1", "50%", "300", "80%", "25%", "2.0 MB/s", "HEALTHY", "250 ms"):
        assert expected in text, (expected, text)
    empty = snapshot({}, None, RequestLog(), CounterRates(), now=0.0)
    assert "no request routed yet" in render(empty) and "store: metrics unavailable" in render(empty)


def test_router_metrics_are_valid_prometheus_text() -> None:
    log = RequestLog()
    log.record(0.3, 0.04, 400, 320, 9, now=0.0)
    log.record(12.0, None, 100, 0, 1, now=1.0)
    loads = {"prefill": [ReplicaLoad("p1", "node-a", running=2, busy_s=7.5, computed_tokens=80, prompt_tokens=500,
                                     cached_tokens=420)]}
    text = render_pools(snapshot(loads, None, log, CounterRates(), now=1.0)) + render_requests(log)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    replica = (("node", "node-a"), ("replica", "p1"), ("role", "prefill"))
    assert samples[("pdserve_replica_running", replica)] == 2
    assert samples[("pdserve_replica_busy_seconds_total", replica)] == 7.5
    assert samples[("pdserve_replica_cached_tokens_total", replica)] == 420
    assert samples[("pdserve_replicas", (("role", "prefill"),))] == 1
    assert samples[("pdserve_requests_total", ())] == 2 and samples[("pdserve_output_tokens_total", ())] == 10
    assert samples[("pdserve_request_ttft_seconds_bucket", (("le", "0.5"),))] == 1  # cumulative buckets
    assert samples[("pdserve_request_ttft_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("pdserve_request_ttft_seconds_count", ())] == 2
    assert samples[("pdserve_request_tpot_seconds_count", ())] == 1  # the one-token answer has no TPOT
