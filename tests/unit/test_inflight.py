"""The prefill work a router has in flight, and a replica seen running late before any of
its prefills answered (``router.policy.inflight``, ``kv_aware`` reading it)."""

from __future__ import annotations

import random

import pytest

from kvstore.messages import ReplicaLoad
from router.policy import KVAwarePolicy, RoutingRequest, RoutingState
from router.policy.inflight import InFlight

CT = 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_replica_is_late_once_its_oldest_prefill_took_twice_its_prediction() -> None:
    clock = Clock()
    f = InFlight(clock, stall_ratio=2.0, grace_s=0.05, max_late=4.0)
    f.dispatched("a", "r1", 100, predicted_s=0.25)
    f.dispatched("a", "r2", 100, predicted_s=0.5)  # queued behind r1
    f.dispatched("b", "r3", 100, predicted_s=0.25)
    assert f.queued_tokens() == {"a": 200, "b": 100}
    clock.now += 0.54
    assert f.late(["a", "b"]) is None  # under twice 0.25 s + the grace: one comparison, no list
    clock.now += 0.26  # 0.8 s: three times r1's 0.25 s (less the grace), and r3's on b
    assert f.late(["a", "b", "c"]) == [pytest.approx(3.0), pytest.approx(3.0), 1.0]
    assert f.finished("r3") == ("b", 0.25)
    assert f.late(["a", "b"]) == [pytest.approx(3.0), 1.0]
    assert f.finished("r1") == ("a", 0.25)  # r2 is the oldest on a now: late from 1.05 s
    assert f.late(["a", "b"]) is None
    clock.now += 0.5
    assert f.late(["a"]) == [pytest.approx(2.5)]
    clock.now += 10.0
    assert f.late(["a"]) == [4.0]  # bounded, as the slowdown is
    f.finished("r2")
    assert f.late(["a", "b"]) is None and f.queued_tokens() == {"a": 0, "b": 0}
    assert f.finished("r2") is None  # twice (a retry's cleanup): nothing


def test_a_retry_moves_its_work_and_a_replica_gone_takes_its_requests_with_it() -> None:
    clock = Clock()
    f = InFlight(clock, grace_s=0.05)
    f.dispatched("a", "r1", 100, predicted_s=0.1)
    f.dispatched("b", "r1", 100, predicted_s=0.1)  # the same request, retried on b
    assert f.queued_tokens() == {"a": 0, "b": 100}
    f.dispatched("a", "r2", 50, predicted_s=0.1)
    clock.now += 0.3
    assert f.late(["a", "b"]) == [pytest.approx(2.5), pytest.approx(2.5)]
    f.retain({"b"})
    assert f.queued_tokens() == {"b": 100} and f.finished("r2") is None
    assert f.late(["a", "b"]) == [1.0, pytest.approx(2.5)]
    f.finished("r1")
    assert f.late(["b"]) is None


def test_the_earliest_deadline_follows_finishes_on_any_replica() -> None:
    """The one comparison that skips the scan must never hide a late replica: checked
    against a full scan over random dispatches and finishes."""
    rng, clock = random.Random(3), Clock()
    f = InFlight(clock, grace_s=0.0)
    live: dict[str, tuple[str, float, float]] = {}  # id -> (replica, sent, predicted)
    for i in range(2000):
        clock.now += rng.uniform(0.0, 0.05)
        if live and rng.random() < 0.5:
            rid = rng.choice(sorted(live))
            del live[rid]
            f.finished(rid)
        else:
            replica, predicted = rng.choice("abcd"), rng.uniform(0.01, 0.3)
            f.dispatched(replica, f"q{i}", 10, predicted)
            live[f"q{i}"] = (replica, clock.now, predicted)
        oldest: dict[str, tuple[float, float]] = {}
        for replica, sent, predicted in live.values():  # dispatch order: the first kept
            oldest.setdefault(replica, (sent, predicted))
        want = [(clock.now - o[0]) / o[1] if clock.now > o[0] + 2 * o[1] else 1.0
                for o in (oldest.get(r, (clock.now, 1.0)) for r in "abcd")]
        got = f.late(list("abcd"))
        assert (got or [1.0] * 4) == [pytest.approx(min(w, 4.0)) for w in want]


def test_kv_aware_sends_the_next_request_away_from_a_replica_stalled_on_the_last() -> None:
    """Two replicas, the prompts cached in neither; a is over twice as fast, so it takes the
    first request, and the second while the first runs on time. When the third comes, the
    first has been out four times its prediction: a is stalled, and b (slower, idle) gets
    the first token out sooner."""
    clock = Clock()
    st = RoutingState(CT, prefill_prior_tps=300.0, clock=clock)
    policy = KVAwarePolicy(st, "prefill", random.Random(0), tie_s=0.0, tie_rel=0.0)
    pool = [ReplicaLoad("a", "n1"), ReplicaLoad("b", "n1")]
    st.observe("prefill", pool)
    for t in range(1, 4):  # a computes 600 tokens per busy second, b 250
        st.observe("prefill", [ReplicaLoad("a", "n1", computed_tokens=600 * t, busy_s=float(t)),
                               ReplicaLoad("b", "n1", computed_tokens=250 * t, busy_s=float(t))])

    def prompt(rid: str, tag: int) -> RoutingRequest:
        return RoutingRequest(rid, "prefill", 8 * CT, tuple(bytes([tag, i]) * 8 for i in range(8)))

    first = policy.route(prompt("r1", 1), pool)
    st.routed(prompt("r1", 1), first)
    assert first.chosen == "a"
    clock.now += 0.1  # r1's prediction: 256 tokens at 600/s, 0.43 s; on time so far
    on_time = policy.route(prompt("r2", 2), pool)
    assert on_time.chosen == "a"  # behind r1: 0.85 s there, 1.02 s on b
    clock.now += 1.8  # 1.9 s: r1 has taken over four times its 0.43 s
    stalled = policy.route(prompt("r3", 3), pool)
    assert stalled.chosen == "b"
    assert stalled.terms_of("a")["rate_tps"] == pytest.approx(st.rates.rate("a") / 4.0, rel=0.05)
    st.finished("r1", engine_s=1.9)  # it answered: the slowdown learns, the lateness goes
    assert st.late(["a", "b"]) is None and st.rates.slowdown("a") > 1.0


def test_a_retry_on_the_same_replica_is_predicted_without_its_earlier_try() -> None:
    clock = Clock()
    st = RoutingState(CT, prefill_prior_tps=100.0, clock=clock)
    st.dispatched("a", "r1", 50)
    st.dispatched("a", "r1", 50)  # retried there: 50 tokens in flight, 0.5 s predicted, not 1.0
    assert st.queued_tokens("a") == 50
    clock.now += 1.04  # under twice 0.5 s + the grace
    assert st.late(["a"]) is None
    clock.now += 0.02
    assert st.late(["a"]) == [pytest.approx((1.06 - 0.05) / 0.5)]
