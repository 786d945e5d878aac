"""The store connector on a tensor-parallel engine, without an engine: the scheduler counts a
chunk only when every rank's shard is stored (one lookup over all ranks' keys), and each
worker saves and loads its own shard under its own rank's key."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")
from kvstore.connector import PDStoreConnector, StoreConnectorMetadata, _Warner  # noqa: E402
from kvstore.connector_plan import LoadItem, SaveItem, StepPlanner  # noqa: E402
from kvstore.hashing import KVNamespace, chunk_keys, rank_key  # noqa: E402
from kvstore.metadata import ChunkLocation  # noqa: E402

NS = KVNamespace("m", "float32", "cpu/bs32", chunk_tokens=32)
PROMPT = list(range(100))  # three full chunks and a partial one
KEYS = chunk_keys(NS, PROMPT)


class FakeStore:
    """The store's metadata as a dict: key -> location; counts round trips."""

    def __init__(self) -> None:
        self.chunks: dict[bytes, ChunkLocation] = {}
        self.lookups = 0

    def put(self, key: bytes) -> None:
        self.chunks[key] = ChunkLocation("n", "s", len(self.chunks), 10, 1)

    def lookup(self, keys: list[bytes]) -> list[ChunkLocation | None]:
        self.lookups += 1
        return [self.chunks.get(k) for k in keys]

    def drain_counters(self) -> dict[str, int]:
        return {}


def connector(tp_size: int, tp_rank: int | None = 0, store: FakeStore | None = None) -> PDStoreConnector:
    """The connector's state without vLLM's constructor (the parts these paths read)."""
    c = object.__new__(PDStoreConnector)
    c.settings = SimpleNamespace(namespace=NS)  # type: ignore[assignment]
    c._tp_size, c._tp_rank = tp_size, tp_rank
    c._enabled = c._load_enabled = True
    c._store = store or FakeStore()  # type: ignore[assignment]
    c._warn, c._counters, c._reqs, c._pending_loads = _Warner(), {}, {}, {}
    c._failed_blocks = set()
    c._planner = StepPlanner(32, 32, save=True)
    return c


def request() -> Any:
    return SimpleNamespace(request_id="r", prompt_token_ids=PROMPT)


def bound(worker: PDStoreConnector) -> StoreConnectorMetadata:
    """What the worker's start_load_kv / wait_for_save read this step."""
    meta = worker._get_connector_metadata()
    assert isinstance(meta, StoreConnectorMetadata)
    return meta


def test_a_chunk_is_a_hit_only_when_every_rank_holds_it() -> None:
    store = FakeStore()
    for k in KEYS:  # rank 0 saved all three chunks, rank 1 only the first two
        store.put(k)
    for k in KEYS[:2]:
        store.put(rank_key(k, 1, 2))
    c = connector(2, store=store)
    assert c.get_num_new_matched_tokens(request(), 0) == (64, False)
    assert store.lookups == 1  # every rank's keys in one round trip
    plan = c._pending_loads["r"]
    assert [len(shards) for shards in plan.locs] == [2, 2]
    assert plan.locs[1] == (store.chunks[KEYS[1]], store.chunks[rank_key(KEYS[1], 1, 2)])


def test_rank_zero_alone_is_no_hit_for_a_tp_engine_but_is_for_tp1() -> None:
    store = FakeStore()
    for k in KEYS:
        store.put(k)
    assert connector(2, store=store).get_num_new_matched_tokens(request(), 0) == (0, False)
    assert connector(1, store=store).get_num_new_matched_tokens(request(), 0) == (96, False)


def test_each_worker_saves_under_its_own_rank_and_the_scheduler_then_finds_all() -> None:
    store = FakeStore()
    planned = StoreConnectorMetadata(saves=[SaveItem(k, (i,)) for i, k in enumerate(KEYS)])
    for rank in range(2):
        worker = connector(2, rank)
        worker.bind_connector_metadata(planned)
        for item in bound(worker).saves:  # what wait_for_save stores
            store.put(item.key)
    assert len(store.chunks) == 2 * len(KEYS)
    assert connector(2, store=store).get_num_new_matched_tokens(request(), 0) == (96, False)


def test_each_worker_loads_its_own_shard_into_the_same_blocks() -> None:
    locs = (ChunkLocation("n", "s", 0, 10, 1), ChunkLocation("n", "s", 64, 10, 2))
    planned = StoreConnectorMetadata(loads=[("r", [LoadItem(KEYS[0], locs[0], (3,), 0, locs)])])
    got = []
    for rank in range(2):
        worker = connector(2, rank)
        worker.bind_connector_metadata(planned)
        [(_req, [item])] = bound(worker).loads
        got.append((item.key, item.loc, item.block_ids))
    assert got == [(KEYS[0], locs[0], (3,)), (rank_key(KEYS[0], 1, 2), locs[1], (3,))]


def test_a_worker_without_its_rank_recomputes_and_saves_nothing() -> None:
    locs = (ChunkLocation("n", "s", 0, 10, 1), ChunkLocation("n", "s", 64, 10, 2))
    planned = StoreConnectorMetadata(loads=[("r", [LoadItem(KEYS[0], locs[0], (3, 4), 0, locs)])],
                                     saves=[SaveItem(KEYS[1], (5,))])
    worker = connector(2, None)
    worker.bind_connector_metadata(planned)
    meta = bound(worker)
    assert not meta.loads and not meta.saves
    assert worker.get_block_ids_with_load_errors() == {3, 4}


def test_tp1_workers_keep_the_planned_metadata() -> None:
    planned = StoreConnectorMetadata(saves=[SaveItem(KEYS[0], (1,))])
    worker = connector(1)
    worker.bind_connector_metadata(planned)
    assert bound(worker) is planned
