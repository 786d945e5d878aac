import pytest

from kvstore.connector_plan import (
    LoadItem,
    LoadPlan,
    RequestState,
    SaveItem,
    StepPlan,
    StepPlanner,
    block_ids_after_step,
    plan_hit,
    stored_prefix,
)
from kvstore.hashing import rank_key
from kvstore.metadata import ChunkLocation

LOC = ChunkLocation("n", "s", 0, 10, 1)


def keys(n: int) -> list[bytes]:
    return [bytes([i]) * 16 for i in range(n)]


def test_hit_leaves_at_least_one_token_to_compute() -> None:
    assert plan_hit(n_prompt=64, n_stored_chunks=2, chunk_tokens=32) == 32
    assert plan_hit(n_prompt=65, n_stored_chunks=2, chunk_tokens=32) == 64
    assert plan_hit(n_prompt=65, n_stored_chunks=0, chunk_tokens=32) == 0
    assert plan_hit(n_prompt=1, n_stored_chunks=5, chunk_tokens=32) == 0


def test_saves_every_completed_chunk_once_across_chunked_prefill() -> None:
    p = StepPlanner(chunk_tokens=64, block_size=32, save=True)
    st = RequestState(keys=keys(3), n_prompt=200, block_ids=[10, 11, 12, 13])
    first = p.save_items(st, tokens_done=100)  # chunk 0 done
    assert [i.block_ids for i in first] == [(10, 11)]
    st.block_ids += [14, 15, 16]
    second = p.save_items(st, tokens_done=200)
    assert [i.key for i in second] == keys(3)[1:3]
    assert p.save_items(st, tokens_done=201) == []


def test_consumer_never_saves() -> None:
    p = StepPlanner(chunk_tokens=32, block_size=32, save=False)
    st = RequestState(keys=keys(2), n_prompt=64, block_ids=[1, 2])
    assert p.save_items(st, 64) == []


def test_load_skips_blocks_the_engine_already_holds() -> None:
    p = StepPlanner(chunk_tokens=64, block_size=32, save=True)
    st = RequestState(keys=keys(3), n_prompt=200, block_ids=[5, 6, 7, 8, 9, 10, 11])
    items = p.load_items(st, LoadPlan(start_token=32, end_token=128, locs=[(LOC,), (LOC,)]))
    assert [(i.block_ids, i.skip_blocks) for i in items] == [((6,), 1), ((7, 8), 0)]
    # loaded chunks are in the store already: no save of them
    assert [i.key for i in p.save_items(st, 200)] == [keys(3)[2]]


def test_step_deduplicates_chunks_shared_by_requests() -> None:
    p = StepPlanner(chunk_tokens=32, block_size=32, save=True)
    out, seen = StepPlan(), set()
    for rid, blocks in (("a", [1, 2]), ("b", [3, 4])):
        p.step(rid, RequestState(keys=keys(2), n_prompt=70, block_ids=blocks), None, 70, out, seen)
    assert [s.block_ids for s in out.saves] == [(1,), (2,)]


def test_block_ids_after_preemption_are_replaced() -> None:
    assert block_ids_after_step([1, 2], [3], resumed=False) == [1, 2, 3]
    assert block_ids_after_step([1, 2], [7, 8], resumed=True) == [7, 8]
    assert block_ids_after_step([1], None, resumed=False) == [1]


def test_chunk_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError):
        StepPlanner(chunk_tokens=48, block_size=32, save=True)


# -- tensor parallelism: a chunk is stored only when every rank's shard is -----------------

def loc(rank: int, chunk: int) -> ChunkLocation:
    return ChunkLocation("n", "s", 1000 * rank + chunk, 10, 1)


def test_stored_prefix_is_the_prefix_every_rank_holds() -> None:
    r0 = [loc(0, 0), loc(0, 1), loc(0, 2), loc(0, 3)]
    r1 = [loc(1, 0), loc(1, 1), None, loc(1, 3)]  # rank 1's shard of chunk 2 was evicted
    got = stored_prefix([r0, r1])
    assert got == [(loc(0, 0), loc(1, 0)), (loc(0, 1), loc(1, 1))]
    assert stored_prefix([r1, r0]) == [(loc(1, 0), loc(0, 0)), (loc(1, 1), loc(0, 1))]  # min over ranks
    assert stored_prefix([[None, *r0[1:]], r1]) == []  # a first chunk missing on one rank: no hit


def test_stored_prefix_of_one_rank_is_its_first_miss() -> None:
    assert stored_prefix([[loc(0, 0), loc(0, 1), None, loc(0, 3)]]) == [(loc(0, 0),), (loc(0, 1),)]
    assert stored_prefix([[]]) == []


def test_tp_load_items_carry_every_rank_and_each_worker_takes_its_own() -> None:
    p = StepPlanner(chunk_tokens=64, block_size=32, save=False)
    st = RequestState(keys=keys(3), n_prompt=200, block_ids=[5, 6, 7, 8, 9, 10, 11])
    locs: list[tuple[ChunkLocation, ...]] = [(loc(0, c), loc(1, c)) for c in range(2)]
    items = p.load_items(st, LoadPlan(start_token=32, end_token=128, locs=locs))
    assert [(i.key, i.loc, i.rank_locs) for i in items] == [(keys(3)[c], loc(0, c), locs[c]) for c in range(2)]
    assert [i.for_rank(0, 2) for i in items] == items
    mine = [i.for_rank(1, 2) for i in items]
    assert [(i.key, i.loc) for i in mine] == [(rank_key(keys(3)[c], 1, 2), loc(1, c)) for c in range(2)]
    assert [(i.block_ids, i.skip_blocks) for i in mine] == [((6,), 1), ((7, 8), 0)]  # same blocks on every rank


def test_tp1_load_items_are_as_before() -> None:
    p = StepPlanner(chunk_tokens=32, block_size=32, save=False)
    st = RequestState(keys=keys(2), n_prompt=70, block_ids=[1, 2, 3])
    items = p.load_items(st, LoadPlan(start_token=0, end_token=64, locs=[(LOC,), (LOC,)]))
    assert items == [LoadItem(keys(2)[0], LOC, (1,), 0), LoadItem(keys(2)[1], LOC, (2,), 0)]


def test_save_items_take_the_rank_key() -> None:
    item = SaveItem(keys(1)[0], (4, 5))
    assert item.for_rank(0, 2) is item
    assert item.for_rank(1, 2) == SaveItem(rank_key(keys(1)[0], 1, 2), (4, 5))
