"""The router's store index on constructed event sequences (no Redis)."""

from __future__ import annotations

from kvstore.metadata import StoreEvent
from router.index import StoreIndex, stream_id_after


def k(i: int) -> bytes:
    return bytes([i]) * 16


def ev(ident: str, op: str, node: str, *keys: int) -> StoreEvent:
    return StoreEvent(ident, op, node, [k(i) for i in keys])


def test_stored_and_removed_per_node_in_any_order_and_repeated() -> None:
    idx = StoreIndex()
    idx.apply([
        ev("1-0", "removed", "A", 9),  # a removal of something never seen: nothing happens
        ev("2-0", "stored", "A", 1, 2, 3),
        ev("3-0", "stored", "B", 1, 2),
        ev("4-0", "stored", "A", 1, 2, 3),  # repeated (a resync overlapping the stream)
        ev("5-0", "removed", "A", 2),
    ])
    assert sorted(idx.holders(k(1))) == ["A", "B"] and idx.holders(k(2)) == ["B"] and idx.holders(k(9)) == []
    assert idx.prefix_by_node([k(1), k(2), k(3)]) == {"A": 1, "B": 2}
    assert idx.stored_prefix([k(1), k(2), k(3)]) == 3  # chunk 2 from B, 3 from A
    idx.apply([ev("6-0", "removed", "B", 1, 2), ev("6-1", "removed", "B", 2)])
    assert idx.stored_prefix([k(1), k(2), k(3)]) == 1 and idx.stats().last_id == "6-1"


def test_bounded_memory_forgets_the_least_recently_touched() -> None:
    idx = StoreIndex(max_chunks=3)
    idx.stored("A", [k(1), k(2), k(3)])
    assert idx.stored_prefix([k(1)]) == 1  # touch chunk 1
    idx.stored("A", [k(4)])
    assert idx.holders(k(2)) == [] and idx.holders(k(1)) == ["A"] and idx.stats().forgotten == 1


def test_a_departed_node_frees_its_slot() -> None:
    idx = StoreIndex()
    idx.stored("A", [k(1)])
    idx.stored("B", [k(1), k(2)])
    idx.drop_node("A")
    assert idx.holders(k(1)) == ["B"]
    idx.stored("C", [k(3)])  # reuses A's slot
    assert idx.holders(k(3)) == ["C"] and idx.holders(k(1)) == ["B"] and idx.stats().nodes == 2


def test_stream_ids_compare_as_numbers() -> None:
    assert stream_id_after("10-0", "9-5") and stream_id_after("9-10", "9-9") and not stream_id_after("9-1", "9-1")
