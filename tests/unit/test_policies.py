"""Each routing policy's decisions on constructed states (no Ray, no engine)."""

from __future__ import annotations

import random

import pytest

from kvstore.messages import ReplicaLoad
from router.index.owners import OwnerIndex
from router.policy import (
    POLICIES,
    KVAwarePolicy,
    LeastLoadedPolicy,
    PrefixTreeApproxPolicy,
    RoundRobinPolicy,
    RoutingRequest,
    RoutingState,
    make_policy,
)
from router.policy.kv_aware import PREFILL_TERMS
from router.policy.state import RateMeter, TransferCosts

CT = 32  # tokens per chunk


def keys(n: int, tag: int = 0) -> tuple[bytes, ...]:
    return tuple(bytes([tag, i]) * 8 for i in range(n))


def req(n_chunks: int, tag: int = 0, role: str = "prefill", rid: str = "r", node: str = "") -> RoutingRequest:
    return RoutingRequest(rid, role, n_chunks * CT + 5, keys(n_chunks, tag), node)


def load(name: str, node: str = "n1", **kw: float) -> ReplicaLoad:
    return ReplicaLoad(name, node, **kw)  # type: ignore[arg-type]


def test_every_configured_policy_is_constructible_and_unknown_names_fail() -> None:
    state = RoutingState(CT)
    for name in POLICIES:
        d = make_policy(name, state, "prefill").route(req(2), [load("a"), load("b")])
        assert d.chosen in {"a", "b"} and d.policy in (name, "least_loaded")
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random", state)


def test_round_robin_takes_turns_in_a_stable_order() -> None:
    p = RoundRobinPolicy("prefill")
    picks = [p.route(req(1), [load("b"), load("a"), load("c")]).chosen for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    assert p.route(req(1), []).groups == []


def test_least_loaded_prefers_idle_and_breaks_ties_randomly() -> None:
    p = LeastLoadedPolicy(rng=random.Random(0))
    loads = [load("busy", inflight=3), load("full", kv_usage=0.9), load("idle", running=4)]
    assert p.rank(None, loads)[0] == ["idle"]  # engine running/waiting are a period old: not scored
    assert {p.route(None, [load("a"), load("b")]).chosen for _ in range(50)} == {"a", "b"}
    assert p.rank(None, []) == []


def test_prefix_tree_follows_the_longest_match_unless_imbalanced() -> None:
    p = PrefixTreeApproxPolicy("prefill", random.Random(0), balance_abs=4)
    loads = [load("a"), load("b")]
    first = p.route(req(8, tag=1), loads)
    assert first.why == "smallest tree"
    again = p.route(req(8, tag=1, rid="r2"), loads)
    assert again.chosen == first.chosen and again.why == "cache"
    other = "b" if first.chosen == "a" else "a"
    fresh = p.route(req(8, tag=2), loads)  # nothing matches: the replica that has seen less
    assert fresh.chosen == other and fresh.why == "smallest tree"
    busy = [load(first.chosen, running=10), load(other)]  # imbalance beats the cache
    d = p.route(req(8, tag=1, rid="r3"), busy)
    assert d.chosen == other and d.why == "balance"


def test_kv_aware_counts_own_cache_then_node_store_then_remote_store() -> None:
    st = RoutingState(CT)
    p = KVAwarePolicy(st, "prefill", random.Random(0), tie_s=0.0, tie_rel=0.0)
    r = req(10)
    st.store.stored("n2", r.chunk_keys)  # the whole prompt is in the store on node n2
    d = p.route(r, [load("a", "n1"), load("b", "n2")])
    assert d.chosen == "b"  # same-node load beats a network pull
    terms = {s.replica: s.terms for s in d.scored}
    assert terms["b"]["node_tokens"] == 320 and terms["b"]["remote_tokens"] == 0  # 5 tokens left to compute
    assert terms["a"]["remote_tokens"] == 320 and terms["a"]["node_tokens"] == 0
    st.engines.record("a", r.chunk_keys)  # a's own cache holds it: free beats any load
    d = p.route(r, [load("a", "n1"), load("b", "n2")])
    assert d.chosen == "a" and {s.replica: s.terms for s in d.scored}["a"]["own_tokens"] == 320


def test_kv_aware_always_leaves_a_token_to_compute() -> None:
    st = RoutingState(CT)
    r = RoutingRequest("r", "prefill", 4 * CT, keys(4))  # prompt is exactly 4 chunks
    st.engines.record("a", r.chunk_keys)
    d = KVAwarePolicy(st, "prefill").route(r, [load("a")])
    assert d.scored[0].terms["own_tokens"] == 4 * CT - 1  # the last token is computed


def test_kv_aware_weighs_queued_work_and_measured_rates_against_the_cache() -> None:
    st = RoutingState(CT, prefill_prior_tps=100.0)
    p = KVAwarePolicy(st, "prefill", random.Random(0), tie_s=0.0, tie_rel=0.0)
    r = req(10)
    st.engines.record("a", r.chunk_keys)
    st.dispatched("a", "other", 5000)  # 50 s of work queued on a: worse than computing on b
    d = p.route(r, [load("a"), load("b")])
    slow = d.scored[-1]
    assert d.chosen == "b" and slow.terms["queued_tokens"] == 5000 and slow.score > 50.0
    st.finished("other")
    assert st.queued_tokens("a") == 0 and p.route(r, [load("a"), load("b")]).chosen == "a"
    # Rates come from each replica's own counters: a fast replica wins a cold prompt.
    for t, slow, fast in ((0.0, 0, 0), (1.0, 100, 1000)):
        pool = [load("slow", computed_tokens=slow, busy_s=t), load("fast", computed_tokens=fast, busy_s=t)]
        st.observe("prefill", pool)
    assert st.rates.rate("fast") == pytest.approx(1000.0)
    assert p.route(req(10, tag=9), [load("slow"), load("fast")]).chosen == "fast"


def test_kv_aware_ties_go_to_the_less_loaded_of_two() -> None:
    st = RoutingState(CT)
    p = KVAwarePolicy(st, "prefill", random.Random(1))
    loads = [load("a", inflight=5), load("b")]  # same estimated TTFT (nothing queued by tokens)
    picks = {p.route(req(3, rid=str(i)), loads).chosen for i in range(20)}
    assert picks == {"b"}
    assert "power of two" in p.route(req(3), loads).why


def test_kv_aware_ties_go_to_the_warmest_own_cache_before_load() -> None:
    st = RoutingState(CT)
    p = KVAwarePolicy(st, "prefill", random.Random(1), tie_s=1.0)  # a wide band: everything ties
    r = req(4)
    st.engines.record("busy-but-warm", r.chunk_keys[:2])
    st.dispatched("busy-but-warm", "other", 200)  # its queue outweighs its cache: a worse score, but a tie
    loads = [load("busy-but-warm", inflight=5), load("idle-cold"), load("idle-cold-2")]
    d = p.route(r, loads)
    assert d.chosen == "busy-but-warm" and "lowest score" in d.why  # one warm candidate left: no draw
    assert min(c.score for c in d.scored) < next(c.score for c in d.scored if c.replica == d.chosen)
    # Keeping a conversation where its cache is pays on its next turns; the idle replicas
    # would each have to load it.
    assert {p.route(req(4, rid=str(i)), loads).chosen for i in range(20)} == {"busy-but-warm"}


def test_kv_aware_decode_prefers_free_kv_and_the_node_with_the_kv() -> None:
    st = RoutingState(CT)
    p = KVAwarePolicy(st, "decode", random.Random(0))
    r = req(4, role="decode", node="n2")
    assert p.route(r, [load("a", "n1"), load("b", "n2")]).chosen == "b"
    assert p.route(r, [load("a", "n1"), load("b", "n2", kv_usage=0.95, inflight=3)]).chosen == "a"
    st.store.stored("n1", r.chunk_keys)  # no prefill node given: the store says where the KV is
    assert p.route(req(4, role="decode"), [load("a", "n1"), load("b", "n2")]).chosen == "a"


def test_kv_aware_decode_counts_the_replicas_a_decode_node_holds_of_the_prompt() -> None:
    st = RoutingState(CT)
    p = KVAwarePolicy(st, "decode", random.Random(0))
    r = req(4, role="decode", node="prefill-node")
    pool = [load("a", "n1"), load("b", "n2")]
    st.store.stored("n2", r.chunk_keys[:3])  # n2 holds replicas of the first three chunks
    d = p.route(r, pool)
    assert d.chosen == "b"  # it pulls one chunk of four over the network, a pulls all four
    assert d.terms_of("a")["remote_kv"] == pytest.approx(1.0) and d.terms_of("b")["remote_kv"] == pytest.approx(0.25)
    st.store.stored("n1", r.chunk_keys)  # n1 holds all of it: as good as the prefill node
    d = p.route(r, pool)
    assert d.chosen == "a" and d.terms_of("a")["remote_kv"] == 0.0
    # A held prefix counts from the first chunk: chunks past a gap load over the network.
    st2 = RoutingState(CT)
    st2.store.stored("n1", r.chunk_keys[1:])
    d = KVAwarePolicy(st2, "decode", random.Random(0)).route(r, pool)
    assert d.terms_of("a")["remote_kv"] == pytest.approx(1.0)


def test_state_explains_retires_and_bounds_what_it_keeps() -> None:
    st = RoutingState(CT, keep_decisions=3)
    p = KVAwarePolicy(st, "prefill")
    for i in range(5):
        r = req(2, rid=f"r{i}")
        d = p.route(r, [load("a"), load("b")])
        st.routed(r, d)
        st.settle()
    assert [rid for rid, _ in st.recent(10)] == ["r2", "r3", "r4"] and st.decisions("r0") == {}
    explained = st.decisions("r4")["prefill"].explain()
    assert explained["policy"] == "kv_aware" and len(explained["candidates"]) == 2
    assert set(PREFILL_TERMS) <= set(explained["candidates"][0])
    assert st.queued_tokens("a") + st.queued_tokens("b") == 5 * (2 * CT + 5)
    st.engines.record("a", keys(2))
    st.observe("prefill", [load("b")])  # a is gone from the pool: its cache and work go too
    assert st.engines.replicas() == [] and st.queued_tokens("a") == 0


def test_rate_meter_and_transfer_costs_measure_online() -> None:
    m = RateMeter(prior_tps=300.0, window_s=1e9)  # a window longer than the run: tokens / busy s
    assert m.rate("x") == 300.0
    m.observe(load("x", computed_tokens=0, busy_s=10.0))
    m.observe(load("x", computed_tokens=400, busy_s=11.0))
    m.observe(load("x", computed_tokens=600, busy_s=12.0))
    assert m.rate("x") == pytest.approx(300.0)  # 600 tokens in 2 busy seconds, not mean(400, 200)
    m.observe(load("x", computed_tokens=610, busy_s=12.06))  # a sliver of odd work barely moves it
    assert m.rate("x") == pytest.approx(610 / 2.06)
    assert m.mean("x") == pytest.approx(610 / 12.06)  # over the replica's life: for replaying a run
    m.observe(load("x", computed_tokens=5, busy_s=0.1))  # restarted: a new baseline, no bogus sample
    assert m.rate("x") == pytest.approx(610 / 2.06) and m.mean("x") == pytest.approx(50.0)
    follows = RateMeter(prior_tps=300.0, window_s=2.0)  # a changed speed wins within a few windows
    for t in range(40):
        follows.observe(load("y", computed_tokens=100 * min(t, 20) + 50 * max(t - 20, 0), busy_s=float(t)))
    assert follows.rate("y") == pytest.approx(50.0, rel=0.01)
    c = TransferCosts()
    c.update({"loaded_local_chunks": 100, "get_seconds:shm_sum_us": 3200,
              "loaded_remote_chunks": 10, "get_seconds:tcp_sum_us": 3200}, chunk_tokens=32)
    assert c.same_node_s_per_token == pytest.approx(1e-6) and c.remote_s_per_token == pytest.approx(1e-5)


def test_a_replica_slower_than_predicted_gets_a_slowdown_and_one_on_time_keeps_none() -> None:
    m = RateMeter(prior_tps=300.0, window_s=1e9)
    m.observe(load("x", computed_tokens=0, busy_s=10.0))
    m.observe(load("x", computed_tokens=300, busy_s=11.0))
    for _ in range(20):
        m.took("x", predicted_s=0.2, engine_s=0.2)
    assert m.slowdown("x") == pytest.approx(1.0) and m.rate("x") == pytest.approx(300.0)
    for _ in range(40):  # runs at half the predicted speed: the rate routing uses halves
        m.took("x", predicted_s=0.2 * m.slowdown("x"), engine_s=0.4)
    assert m.slowdown("x") == pytest.approx(2.0, rel=0.01) and m.rate("x") == pytest.approx(150.0, rel=0.01)
    assert m.measured("x") == pytest.approx(300.0)  # the counters' rate is kept apart
    before = m.slowdown("x")
    m.took("x", predicted_s=0.2, engine_s=100.0)  # one stall moves it by 2 ** weight at most
    assert m.slowdown("x") == pytest.approx(before * 2 ** 0.2)
    m.took("x", predicted_s=0.001, engine_s=0.5)  # a one-token probe: fixed costs, not rate
    m.took("x", predicted_s=0.2, engine_s=0.0)  # no engine time reported
    assert m.slowdown("x") == pytest.approx(before * 2 ** 0.2)
    m.took("new", predicted_s=0.1, engine_s=0.2)  # not measured yet: the prior, slowed
    assert m.rate("new") == pytest.approx(300.0 / 2 ** 0.2)
    m.retain({"x"})
    assert m.rate("new") == 300.0 and m.slowdown("new") == 1.0 and m.measured("x") is not None


def test_the_ingress_holds_each_prefills_engine_time_against_its_decision() -> None:
    """routed -> finished(engine_s): the prediction is (work in flight there + this work) /
    rate at the decision; a replica that keeps taking twice that loses work to one on time."""
    st = RoutingState(CT, prefill_prior_tps=320.0)
    policy = KVAwarePolicy(st, "prefill", rng=random.Random(0))
    pool = [load("a"), load("b")]
    st.observe("prefill", pool)
    d = policy.route(req(4, rid="r1"), pool)
    st.routed(req(4, rid="r1"), d)
    first = d.chosen
    st.finished("r1")  # failed or cancelled: no engine time, nothing learnt
    assert st.rates.slowdown(first) == 1.0 and st.queued_tokens(first) == 0
    for i in range(30):
        r = req(4, tag=i + 1, rid=f"s{i}")
        st.dispatched("a", r.request_id, 133)  # 133 tokens at 320/s: predicted 0.416 s
        st.finished(r.request_id, engine_s=2 * 133 / st.rates.rate("a"))
        st.dispatched("b", r.request_id, 133)
        st.finished(r.request_id, engine_s=133 / st.rates.rate("b"))
    assert st.rates.slowdown("a") > 1.8 and st.rates.slowdown("b") == pytest.approx(1.0)
    snap = st.snapshot()["replicas"]
    assert snap["a"]["prefill_slowdown"] > 1.8 and snap["a"]["prefill_tps"] < 180
    assert snap["a"]["prefill_counted"] == [load("a").computed_tokens, pytest.approx(load("a").busy_s)]
    picks = [policy.route(req(4, tag=100 + i, rid=f"t{i}"), pool).chosen for i in range(20)]
    assert picks.count("b") == 20  # equal caches, equal queues: the one that runs as predicted


def test_owner_index_prefix_depths_match_a_plain_walk() -> None:
    rng = random.Random(7)
    idx = OwnerIndex()
    owners = [f"o{i}" for i in range(9)]
    universe = keys(12)
    held = {o: set(rng.sample(universe, rng.randint(0, 12))) for o in owners}
    for o, ks in held.items():
        idx.add(o, ks)
    idx.drop_owner("o3")
    del held["o3"]
    for _ in range(50):
        prompt = universe[: rng.randint(1, 12)]
        want = {}
        for o, ks in held.items():
            depth = next((i for i, k in enumerate(prompt) if k not in ks), len(prompt))
            if depth:
                want[o] = depth
        assert idx.prefix_depths(prompt) == want
        depths, anywhere = idx.prefix_depths_and_any(prompt)
        assert depths == want and anywhere == idx.any_prefix(prompt)


def test_two_routers_fed_the_same_streams_agree_without_talking() -> None:
    """Router replicas share no state: each builds its own from the same store stream and
    engine events. Fed the same, with the same loads, they make the same choices."""
    routers = [RoutingState(CT) for _ in range(2)]
    for st in routers:
        st.store.stored("n2", keys(6, tag=3))
        st.engines.record("a", keys(3, tag=4))
    pool = [load("a", "n1"), load("b", "n2"), load("c", "n2", inflight=4)]
    for tag in (3, 4, 5):
        picks = {KVAwarePolicy(st, "prefill", random.Random(9)).route(req(6, tag=tag), pool).chosen for st in routers}
        assert len(picks) == 1


def test_queued_work_counts_blocking_loads_and_reports_only_when_routers_share_the_pool() -> None:
    st = RoutingState(CT, prefill_prior_tps=100.0)
    st.costs.remote_s_per_token = 1e-3
    r = req(10)
    st.store.stored("n9", r.chunk_keys)  # all of it remote for a replica on n1
    p = KVAwarePolicy(st, "prefill", random.Random(0))
    st.routed(r, p.route(r, [load("a", "n1")]))
    assert st.queued_tokens("a") == 5 + 32  # 5 computed + 0.32 s of pulls at 100 tok/s
    stale = [load("a", "n1", queued_tokens=90_000), load("b", "n1")]  # a's report: a period old
    terms = {s.replica: s.terms for s in KVAwarePolicy(st, "prefill").route(req(3, tag=7), stale).scored}
    assert terms["a"]["queued_tokens"] == 37 and terms["b"]["queued_tokens"] == 0
    shared = RoutingState(CT, shared_routers=True)
    d = KVAwarePolicy(shared, "prefill", random.Random(0)).route(req(3, tag=7), stale)
    assert d.chosen == "b"  # another router's work, seen in a's report


def test_top_reads_the_chosen_and_the_best_others_only() -> None:
    st = RoutingState(CT)
    pool = [load(f"r{i}", inflight=i) for i in range(10)]
    d = KVAwarePolicy(st, "prefill", random.Random(3)).route(req(2), pool)
    top = d.top(3)
    assert top[0].replica == d.chosen and len(top) == 3
    assert [s.replica for s in top] == [s.replica for s in d.scored[:3]]
    assert LeastLoadedPolicy(rng=random.Random(0)).route(None, pool).top(2)[0].replica == "r0"


def test_kv_aware_prices_the_chosen_replicas_work_as_the_state_would_from_its_terms() -> None:
    """``RouteDecision.work_tokens`` (priced while scoring) is what ``RoutingState`` works
    out from the chosen candidate's terms, for warm, store-node, remote and sampled picks."""
    rng = random.Random(5)
    st = RoutingState(CT, prefill_prior_tps=100.0)
    st.costs.same_node_s_per_token, st.costs.remote_s_per_token = 2e-4, 1e-3
    pool = [load(f"p{i:02d}", f"n{i // 8}") for i in range(40)]  # > 16: kv_aware samples
    p = KVAwarePolicy(st, "prefill", random.Random(1))
    seen = set()
    for i in range(300):
        r = req(rng.randint(1, 8), tag=rng.randint(0, 5))
        st.store.stored(f"n{rng.randint(0, 4)}", r.chunk_keys[: rng.randint(0, len(r.chunk_keys))])
        if rng.random() < 0.5:
            st.engines.record(f"p{rng.randint(0, 39):02d}", r.chunk_keys[: rng.randint(0, len(r.chunk_keys))])
        d = p.route(r, pool[: rng.choice((3, 40))])
        assert d.work_tokens == st._work_tokens(r, d, d.chosen) >= 1
        terms = d.terms_of(d.chosen)
        seen.add((terms["own_tokens"] > 0, terms["node_tokens"] > 0, terms["remote_tokens"] > 0))
        st.routed(r, d)
        if i % 3 == 0:
            st.finished(r.request_id)
    assert len(seen) >= 4  # the priced work was checked on several kinds of pick


def test_a_routed_prompt_counts_in_its_replicas_own_cache_at_once_where_the_engine_reports_its_cache() -> None:
    """A burst of conversations on two system prompts, all cold: the second request on a
    prompt goes where that prompt is being computed, not to whichever replica is free-er
    (bench.policies run 8: before, it went cold on the other replica)."""
    state = RoutingState(CT)
    policy = KVAwarePolicy(state, rng=random.Random(0))
    pool = [load("a", kv_events="tcp://a:1"), load("b", kv_events="tcp://b:1")]  # type: ignore[arg-type]
    state.observe("prefill", pool)
    system = [keys(10, tag) for tag in (1, 2)]  # two system prompts of 10 chunks
    chosen = {}
    for i in range(4):  # conversation i on system prompt i % 2, each with a turn of its own
        r = RoutingRequest(f"c{i}", "prefill", 12 * CT + 5, system[i % 2] + keys(2, 10 + i))
        d = policy.route(r, pool)
        state.routed(r, d)
        if i == 0:  # routed keeps the work in flight; the cache comes when the state settles
            assert state.engines.prefix_by_replica(r.chunk_keys) == {} and state.queued_tokens(d.chosen) > 0
        state.settle()
        chosen[i] = d.chosen
    assert chosen[0] != chosen[1]  # the first two split (the second would queue behind the first)
    assert chosen[2] == chosen[0] and chosen[3] == chosen[1]  # each prompt's followers join it
    assert state.engines.prefix_by_replica(system[0]) == {chosen[0]: 10}


def test_an_engine_without_cache_events_never_gets_routed_prompts_recorded() -> None:
    state = RoutingState(CT)
    pool = [load("quiet"), load("reporting", kv_events="tcp://r:1")]  # type: ignore[arg-type]
    state.observe("prefill", pool)
    for name in ("quiet", "reporting"):
        r = req(4, tag=7, rid=name)
        d = RoundRobinPolicy("prefill").route(r, [load(name)])
        state.routed(r, d)
        state.settle()
    # nothing would ever take the quiet engine's entries back: it gets none
    assert state.engines.prefix_by_replica(keys(4, 7)) == {"reporting": 4}
    state.observe("prefill", [load("quiet")])  # the reporting replica left the pool
    r = req(4, tag=8, rid="again")
    d = RoundRobinPolicy("prefill").route(r, [load("reporting")])
    state.routed(r, d)
    state.settle()
    assert state.engines.prefix_by_replica(keys(4, 8)) == {}
