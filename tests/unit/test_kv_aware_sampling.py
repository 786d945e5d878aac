"""kv_aware in a large pool: the warm replicas scored exactly, a sample of the cold ones
(``router.policy.sampling``); a small pool scored whole."""

from __future__ import annotations

import random

from kvstore.messages import ReplicaLoad
from router.index.owners import OwnerIndex
from router.policy import KVAwarePolicy, RoutingRequest, RoutingState
from router.policy.sampling import ColdSampler

CT = 32
PER_NODE = 8


def keys(n: int, tag: int = 0) -> tuple[bytes, ...]:
    return tuple(bytes([tag, i]) * 8 for i in range(n))


def req(n_chunks: int, tag: int = 0, rid: str = "r") -> RoutingRequest:
    return RoutingRequest(rid, "prefill", n_chunks * CT + 5, keys(n_chunks, tag))


def pool(n: int) -> list[ReplicaLoad]:
    return [ReplicaLoad(f"p{i:03d}", f"n{i // PER_NODE}") for i in range(n)]


def test_a_small_pool_is_scored_whole_and_says_nothing_of_sampling() -> None:
    st = RoutingState(CT)
    st.engines.record("p003", keys(4))
    for size in (2, 16):
        d = KVAwarePolicy(st, "prefill", random.Random(0)).route(req(4), pool(size))
        assert len(d.candidates) == size and d.sampled == ()
        explained = d.explain()
        assert "pool" not in explained and all("sampled" not in c for c in explained["candidates"])


def test_a_large_pool_scores_every_warm_replica_and_a_sample_of_the_rest() -> None:
    st = RoutingState(CT)
    warm = {"p005", "p070", "p131", "p199"}
    for name in warm:
        st.engines.record(name, keys(3))
    st.dispatched("p005", "other", 100_000)  # a warm replica too busy to win: still scored
    p = KVAwarePolicy(st, "prefill", random.Random(0))
    for i in range(50):
        d = p.route(req(6, rid=str(i)), pool(200))
        names = {c[0] for c in d.candidates}
        assert warm <= names and len(names) < 40
        assert set(d.sampled) == names - warm  # the rest were drawn
        assert d.chosen in warm - {"p005"}  # the cache decides among the scored
        assert sum(map(len, d.groups)) == 200  # every replica stays a fallback
    assert len(KVAwarePolicy(st, "prefill", random.Random(0)).route(req(6), pool(17)).candidates) < 17


def test_the_explanation_marks_the_sampled_candidates() -> None:
    st = RoutingState(CT)
    st.engines.record("p010", keys(2))
    explained = KVAwarePolicy(st, "prefill", random.Random(0)).route(req(2), pool(64)).explain()
    assert explained["pool"] == 64
    flags = {c["replica"]: c["sampled"] for c in explained["candidates"]}
    assert flags["p010"] is False and sum(flags.values()) == len(flags) - 1
    assert explained["candidates"][0]["own_tokens"] == 2 * CT


def test_seeded_policies_sample_and_decide_the_same() -> None:
    runs = []
    for _ in range(2):
        st = RoutingState(CT)
        st.store.stored("n3", keys(8, tag=1))
        p = KVAwarePolicy(st, "prefill", random.Random(7))
        runs.append([(d.chosen, tuple(c[0] for c in d.candidates))
                     for d in (p.route(req(8, tag=i % 3, rid=str(i)), pool(128)) for i in range(30))])
    assert runs[0] == runs[1]


def test_the_nodes_holding_the_prompt_in_their_store_are_always_sampled() -> None:
    st = RoutingState(CT)
    st.store.stored("n5", keys(8))  # replicas p040..p047 load it from their own node
    p = KVAwarePolicy(st, "prefill", random.Random(1), tie_s=0.0, tie_rel=0.0)
    for i in range(30):
        d = p.route(req(8, rid=str(i)), pool(64))
        assert len({c[0] for c in d.candidates if c[0].startswith("p04")}) >= 2
        assert d.chosen.startswith("p04")  # a same-node load beats a network pull


def test_an_idle_replica_is_found_by_the_draws() -> None:
    st = RoutingState(CT)
    loads = pool(256)
    for r in loads:
        st.dispatched(r.replica, f"w-{r.replica}", 4000)
    st.finished("w-p123")  # one idle replica: 4 draws of 256, about one decision in 64 draws it
    p = KVAwarePolicy(st, "prefill", random.Random(2))
    picks = [p.route(req(2, tag=9, rid=str(i)), loads).chosen for i in range(640)]
    assert 4 <= picks.count("p123") <= 20  # chosen whenever drawn


def test_sampler_positions_lead_with_the_warm_ones_and_repeat_none() -> None:
    s = ColdSampler(random.Random(3))
    by_node = {f"n{k}": list(range(k * PER_NODE, (k + 1) * PER_NODE)) for k in range(8)}
    node_depth = {"n1": 2, "n6": 5}  # shallowest first, as the index returns them
    for _ in range(100):
        picks = s.positions([9, 60], 64, node_depth, by_node)
        assert picks[:2] == [9, 60] and len(picks) == len(set(picks))
        assert all(0 <= i < 64 for i in picks)
        assert len([i for i in picks if 48 <= i < 56]) >= 2  # n6, the deepest node
    assert not ColdSampler(random.Random(0)).samples(16) and ColdSampler(random.Random(0)).samples(17)


def test_prefix_depths_come_shallowest_first() -> None:
    idx = OwnerIndex()
    prompt = keys(6)
    for owner, depth in (("deep", 6), ("mid", 3), ("shallow", 1), ("mid2", 3)):
        idx.add(owner, prompt[:depth])
    depths = idx.prefix_depths(prompt)
    assert list(depths.values()) == sorted(depths.values()) and list(depths)[-1] == "deep"


def test_past_eight_warm_replicas_the_deepest_are_kept_and_the_cut_depth_is_drawn_fairly() -> None:
    s = ColdSampler(random.Random(4))
    members = {f"p{i:03d}": i for i in range(64)}
    # shallowest first, as the index returns them: 20 replicas hold the system prompt (2
    # chunks), 5 the conversation (6), one more outside this pool, 1 its latest turn (9)
    own_depth = {f"p{i:03d}": 2 for i in range(20)} | {"elsewhere": 4}
    own_depth |= {f"p{i:03d}": 6 for i in range(20, 25)} | {"p030": 9}
    drawn: dict[str, int] = {}
    for _ in range(400):
        kept = s.warm(own_depth, members)
        assert len(kept) == 8 and [d for _, d in kept] == sorted(d for _, d in kept)
        names = [n for n, _ in kept]
        assert set(names[-6:]) == {"p020", "p021", "p022", "p023", "p024", "p030"}  # every deeper one
        assert len(set(names)) == 8 and "elsewhere" not in names
        for name in names[:2]:  # two of the 20 at the cut depth
            drawn[name] = drawn.get(name, 0) + 1
    assert len(drawn) == 20 and min(drawn.values()) >= 20  # each about 40 times in 400
    few = {f"p{i:03d}": 2 for i in range(8)}
    assert s.warm(few, members) == list(few.items())  # eight or fewer: all of them


def test_a_hot_prefix_in_every_cache_costs_a_bounded_number_of_candidates() -> None:
    st = RoutingState(CT)
    for i in range(64):
        st.engines.record(f"p{i:03d}", keys(2))  # the system prompt, everywhere
    st.engines.record("p017", keys(5))  # the conversation, on one
    d = KVAwarePolicy(st, "prefill", random.Random(0)).route(req(6), pool(64))
    assert len(d.candidates) <= 8 + 4 + 4 and d.chosen == "p017"
