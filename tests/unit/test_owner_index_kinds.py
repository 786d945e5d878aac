"""The router's one table for both indexes (``router.index.owners``, store nodes and engine
replicas as two kinds of owner) against plain sets: per-kind walks and counts, the one-walk
view ``kv_aware`` reads, clearing one kind, dropping owners, LRU forgetting."""

from __future__ import annotations

import random

from router.index.owners import ENGINE, STORE_NODE, OwnerIndex
from router.policy import RoutingState


def keys(n: int, tag: int = 0) -> list[bytes]:
    return [bytes([tag, i]) * 8 for i in range(n)]


def depth_in(held: set[bytes], prompt: list[bytes]) -> int:
    return next((i for i, k in enumerate(prompt) if k not in held), len(prompt))


def expected(held: dict[tuple[int, str], set[bytes]], prompt: list[bytes], kind: int) -> dict[str, int]:
    out = {o: depth_in(ks, prompt) for (k, o), ks in held.items() if k == kind}
    return {o: d for o, d in out.items() if d}


def check(idx: OwnerIndex, held: dict[tuple[int, str], set[bytes]], universe: list[bytes], rng: random.Random) -> None:
    for kind in (STORE_NODE, ENGINE):
        assert idx.count(kind) == len(set().union(*(ks for (k, _o), ks in held.items() if k == kind)))
    assert len(idx) == len(set().union(*held.values()))
    for _ in range(20):
        prompt = universe[: rng.randint(1, len(universe))]
        engines, nodes, stored = idx.engine_and_store_depths(prompt)
        assert engines == expected(held, prompt, ENGINE) == idx.prefix_depths(prompt, ENGINE)
        assert nodes == expected(held, prompt, STORE_NODE) == idx.prefix_depths(prompt, STORE_NODE)
        store_any = set().union(*(ks for (k, _o), ks in held.items() if k == STORE_NODE))
        assert stored == depth_in(store_any, prompt) == idx.any_prefix(prompt, STORE_NODE)
        assert list(nodes.values()) == sorted(nodes.values())  # shallowest first, as callers read them


def test_two_kinds_in_one_table_answer_as_two_tables_would() -> None:
    rng = random.Random(3)
    idx = OwnerIndex(kinds=2)
    universe = keys(14)
    held: dict[tuple[int, str], set[bytes]] = {}
    # The same name as a node and as a replica: two owners, one of each kind.
    owners = [(STORE_NODE, "n1"), (STORE_NODE, "n2"), (STORE_NODE, "x"), (ENGINE, "x"), (ENGINE, "r1"), (ENGINE, "r2")]
    for step in range(300):
        kind, owner = rng.choice(owners)
        ks = rng.sample(universe, rng.randint(1, 6))
        if rng.random() < 0.6:
            idx.add(owner, ks, kind)
            held.setdefault((kind, owner), set()).update(ks)
        elif rng.random() < 0.8:
            idx.remove(owner, ks, kind)
            held.get((kind, owner), set()).difference_update(ks)
        else:
            idx.drop_owner(owner, kind)
            held.pop((kind, owner), None)
        if step % 50 == 49:  # a store resync: every node forgotten, the engines' caches kept
            idx.clear(STORE_NODE)
            held = {o: ks for o, ks in held.items() if o[0] != STORE_NODE}
        held = {o: ks for o, ks in held.items() if ks}
        check(idx, held, universe, rng)


def test_forgetting_the_least_recent_chunk_uncounts_it_for_each_kind_that_held_it() -> None:
    idx = OwnerIndex(max_chunks=3, kinds=2)
    a, b, c, d = keys(4)
    idx.add("n1", [a], STORE_NODE)
    idx.add("r1", [a], ENGINE)
    idx.add("n1", [b], STORE_NODE)
    idx.add("r1", [c], ENGINE)
    assert (idx.count(STORE_NODE), idx.count(ENGINE), len(idx)) == (2, 2, 3)
    idx.add("r1", [d], ENGINE)  # a is the least recently touched: it goes, from both kinds
    assert (idx.count(STORE_NODE), idx.count(ENGINE), len(idx)) == (1, 2, 3) and idx.forgotten == 1
    assert idx.holders(a, STORE_NODE) == [] and idx.holders(b, STORE_NODE) == ["n1"]


def test_a_freed_slot_serves_an_owner_of_another_kind() -> None:
    idx = OwnerIndex(kinds=2)
    k = keys(3)
    idx.add("n1", k, STORE_NODE)
    idx.drop_owner("n1", STORE_NODE)
    idx.add("r1", k[:2], ENGINE)  # takes n1's slot
    assert idx.engine_and_store_depths(k) == ({"r1": 2}, {}, 0)
    assert idx.owner_names(STORE_NODE) == [] and idx.owner_names(ENGINE) == ["r1"]


def test_the_routing_state_shares_one_table_and_a_store_resync_keeps_the_engines() -> None:
    st = RoutingState(chunk_tokens=32)
    k = keys(5)
    st.store.stored("n1", k[:4])
    st.engines.record("r1", k[:2])
    assert st.prefix_view(k) == ({"r1": 2}, {"n1": 4}, 4) and st.indexed_chunks == 4
    assert st.prefix_view(()) == ({}, {}, 0)

    class NoChunks:  # what a resync reads from Redis, here: one node, holding the last two
        def stream_bounds(self) -> tuple[str, str]:
            return ("1-0", "7-0")

        def agents(self) -> list[object]:
            return [type("A", (), {"node_id": "n2"})()]

        def node_chunk_keys(self, node_id: str) -> list[bytes]:
            return k[3:]

    st.store.resync(NoChunks())  # type: ignore[arg-type]
    assert st.prefix_view(k) == ({"r1": 2}, {}, 0) and st.store.stats().last_id == "7-0"
    assert len(st.store) == 2 and len(st.engines) == 2 and st.store.holders(k[3]) == ["n2"]
