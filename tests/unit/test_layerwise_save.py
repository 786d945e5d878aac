"""The save overlapped with the forward, without a GPU: the store's put split into place /
finish / abort (a real segment, a fake agent), and the connector's step logic around
``save_kv_layer`` / ``wait_for_save`` with a stand-in for the GPU's layer copies: the slots
are placed once per step at its first layer, a step that saw every layer commits what went
out layer by layer, one that did not fills the same slots the whole-chunk way, a failed or
abandoned step gives its slots back and stores nothing, and the switch and CPU engines keep
today's path. The GPU copies themselves: tests/unit/test_gpu_layerwise.py (Triton's
interpreter) and tests/gpu (the engine on an H200)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

from kvstore import connector as connmod  # noqa: E402
from kvstore.client import ChunkToSave, Placement, StoreClient, StoreError  # noqa: E402
from kvstore.connector import PDStoreConnector, StoreConnectorMetadata, _Warner  # noqa: E402
from kvstore.connector_plan import SaveItem  # noqa: E402
from kvstore.segment import HEADER_BYTES, Segment, checksum  # noqa: E402

NBYTES = 64


# -- the store: place, finish, abort ---------------------------------------------------------


class FakeAgent:
    """Slots back to back from offset 0; records commits and aborts."""

    def __init__(self, room: int = 8, fail_commit: bool = False) -> None:
        self.room, self.fail_commit = room, fail_commit
        self.committed: list[Any] = []
        self.aborted: list[list[int]] = []

    def allocate(self, lengths: list[int]) -> list[int]:
        return [i * (HEADER_BYTES + n) for i, n in enumerate(lengths[: self.room])]

    def commit(self, entries: list[Any]) -> int:
        if self.fail_commit:
            raise ConnectionError("agent gone mid-commit")
        self.committed += entries
        return len(entries)

    def abort(self, offsets: list[int]) -> None:
        self.aborted.append(list(offsets))


@pytest.fixture
def seg() -> Iterator[Segment]:
    s = Segment.create(f"pdkv-test-{uuid.uuid4().hex[:8]}", 1 << 16)
    yield s
    s.close()


def client(seg: Segment, agent: FakeAgent) -> StoreClient:
    """StoreClient's put on this node against ``seg`` and ``agent`` (no Redis, no agent process)."""
    c = object.__new__(StoreClient)
    c.node_id, c.counters = "n", {}
    c._agents = SimpleNamespace(get=lambda node: (SimpleNamespace(segment=seg.name), agent))  # type: ignore[assignment]
    c.shm = SimpleNamespace(segment=lambda name: seg, name="shm")  # type: ignore[assignment]
    return c


def chunks(n: int) -> list[ChunkToSave]:
    return [ChunkToSave(bytes([i]) * 16, NBYTES) for i in range(n)]


def test_place_then_finish_seals_and_commits_what_was_written(seg: Segment) -> None:
    agent = FakeAgent()
    c = client(seg, agent)
    placed = c.place(chunks(3))
    assert [len(p) for p in placed.payloads] == [NBYTES] * 3 and not agent.committed
    for i, p in enumerate(placed.payloads):
        p[:] = bytes([i + 1]) * NBYTES
    digests = [checksum(placed.payloads[0]), None, checksum(placed.payloads[2])]  # None: the client hashes it
    assert c.finish(placed, digests) == 3
    assert [e.checksum for e in agent.committed] == [checksum(bytes([i + 1]) * NBYTES) for i in range(3)]
    assert bytes(seg.verify(agent.committed[1].offset, agent.committed[1].key, NBYTES, agent.committed[1].checksum))
    assert not agent.aborted and placed.closed
    with pytest.raises(StoreError):
        c.finish(placed, digests)  # a placement ends once


def test_abort_gives_the_slots_back_once(seg: Segment) -> None:
    agent = FakeAgent()
    c = client(seg, agent)
    placed = c.place(chunks(2))
    c.abort(placed)
    c.abort(placed)
    assert agent.aborted == [placed.offsets] and not agent.committed


def test_a_failed_commit_or_a_wrong_digest_count_aborts(seg: Segment) -> None:
    agent = FakeAgent(fail_commit=True)
    c = client(seg, agent)
    placed = c.place(chunks(2))
    with pytest.raises(ConnectionError):
        c.finish(placed, [None, None])
    assert agent.aborted == [placed.offsets]
    agent = FakeAgent()
    c = client(seg, agent)
    placed = c.place(chunks(2))
    with pytest.raises(ValueError):
        c.finish(placed, [None])
    assert agent.aborted == [placed.offsets] and not agent.committed


def test_a_full_segment_places_a_prefix_and_batch_put_all_still_works(seg: Segment) -> None:
    agent = FakeAgent(room=2)
    c = client(seg, agent)
    placed = c.place(chunks(3))
    assert [ch.key for ch in placed.chunks] == [ch.key for ch in chunks(2)]
    c.abort(placed)

    def fill(payloads: Sequence[memoryview]) -> list[int | None]:
        for p in payloads:
            p[:] = b"z" * NBYTES
        return [None] * len(payloads)

    assert c.batch_put_all(chunks(3), fill) == 2

    def broken(payloads: Sequence[memoryview]) -> list[int | None]:
        raise RuntimeError("copy failed")

    with pytest.raises(RuntimeError):
        c.batch_put_all(chunks(2), broken)
    assert agent.aborted[-1] == [0, HEADER_BYTES + NBYTES]


# -- the connector's step --------------------------------------------------------------------


class FakeStore:
    """place / finish / abort / batch_put_all as the connector calls them, recorded."""

    def __init__(self, place_error: Exception | None = None) -> None:
        self.place_error = place_error
        self.placed: list[Placement] = []
        self.finished: list[list[int | None]] = []
        self.aborted: list[Placement] = []
        self.put_all = 0
        self.counters: dict[str, int] = {}
        self.meta = SimpleNamespace(add_counters=self._add_counters)

    def _add_counters(self, instance: str, counters: dict[str, int], at: float) -> None:
        for name, n in counters.items():
            self.counters[name] = self.counters.get(name, 0) + n

    def place(self, chunks: Sequence[ChunkToSave]) -> Placement:
        if self.place_error is not None:
            raise self.place_error
        p = Placement("n", None, None, list(chunks), list(range(len(chunks))),  # type: ignore[arg-type]
                      [memoryview(bytearray(c.nbytes)) for c in chunks])
        self.placed.append(p)
        return p

    def finish(self, placed: Placement, digests: Sequence[int | None]) -> int:
        assert not placed.closed
        placed.closed = True
        self.finished.append(list(digests))
        return len(digests)

    def abort(self, placed: Placement) -> None:
        if not placed.closed:
            placed.closed = True
            self.aborted.append(placed)

    def batch_put_all(self, chunks: Sequence[ChunkToSave], fill_all: Any) -> int:
        self.put_all += 1
        return len(fill_all([memoryview(bytearray(c.nbytes)) for c in chunks]))

    def drain_counters(self) -> dict[str, int]:
        return {}


class FakeLayers:
    """What LayerwiseSave does, as calls: the layers queued, then finish or cancel."""

    instances: list[FakeLayers] = []

    def __init__(self, path: Any, block_ids: Sequence[Sequence[int]], payloads: Sequence[memoryview],
                 group_bytes: int) -> None:
        self.block_ids, self.payloads = block_ids, payloads
        self.seen: list[int] = []
        self.cancelled = self.finished = False
        self.fail_finish = False
        FakeLayers.instances.append(self)

    @property
    def complete(self) -> bool:
        return sorted(set(self.seen)) == [0, 1, 2]

    def layer(self, i: int) -> None:
        self.seen.append(i)

    def finish(self, on_staged: Any = None) -> list[int]:
        if self.fail_finish:
            self.cancel()
            raise RuntimeError("CUDA error in the hash")
        self.finished = True
        self.cancel()
        return [100 + c for c in range(len(self.payloads))]

    def cancel(self) -> None:
        self.cancelled = True


LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn", "model.layers.2.self_attn.attn"]


@pytest.fixture
def fake_layers(monkeypatch: pytest.MonkeyPatch) -> type[FakeLayers]:
    pytest.importorskip("triton", reason="triton is not installed")
    from kvstore import gpu_layerwise

    FakeLayers.instances = []
    monkeypatch.setattr(gpu_layerwise, "LayerwiseSave", FakeLayers)
    return FakeLayers


def connector(store: FakeStore, layerwise: bool = True) -> PDStoreConnector:
    """A worker-side connector on a stand-in GPU path (the parts the save reads)."""
    c = object.__new__(PDStoreConnector)
    c._tp_size, c._tp_rank, c._enabled = 1, 0, True
    c._store = store  # type: ignore[assignment]
    c.settings = SimpleNamespace(instance="prefill-0")  # type: ignore[assignment]
    c._warn, c._counters, c._failed_blocks = _Warner(), {}, set()
    c._tier, c._connector_metadata = None, None
    c._layer_index = {name: i for i, name in enumerate(LAYERS)}
    c._layerwise, c._step, c._step_tried = layerwise, None, False
    c._layerwise_min_bytes = 0
    c._parent_pid = connmod.os.getppid()
    c._chunk_nbytes = lambda: NBYTES  # type: ignore[method-assign]
    c._extracted: list[Any] = []  # type: ignore[attr-defined]

    def extract_all(items: list[SaveItem], payloads: Sequence[memoryview]) -> list[int | None]:
        c._extracted.append([bytes(it.key) for it in items[: len(payloads)]])  # type: ignore[attr-defined]
        return [7] * len(payloads)

    c._extract_all = extract_all  # type: ignore[method-assign]
    c._gpu = SimpleNamespace(gpu_checksums=True)
    return c


def step(c: PDStoreConnector, n_saves: int = 2) -> None:
    """What vLLM's runner does before a forward: bind the step's plan."""
    c.bind_connector_metadata(StoreConnectorMetadata(saves=[SaveItem(bytes([i]) * 16, (2 * i, 2 * i + 1))
                                                            for i in range(n_saves)]))


def counted(c: PDStoreConnector) -> dict[str, int]:
    """The connector's counters, flushed or not."""
    out = dict(c._store.counters)  # type: ignore[attr-defined]
    for name, n in c._counters.items():
        out[name] = out.get(name, 0) + n
    return out


def forward(c: PDStoreConnector, layers: Sequence[str] = tuple(LAYERS)) -> None:
    for name in layers:
        c.save_kv_layer(name, torch.empty(0), None)


def test_a_step_places_once_and_commits_what_went_out_layer_by_layer(fake_layers: type[FakeLayers]) -> None:
    store = FakeStore()
    c = connector(store)
    step(c)
    forward(c)
    assert len(store.placed) == 1 and len(fake_layers.instances) == 1
    layers = fake_layers.instances[0]
    assert layers.seen == [0, 1, 2] and layers.block_ids == [(0, 1), (2, 3)]
    assert layers.payloads == store.placed[0].payloads
    c.wait_for_save()
    assert store.finished == [[100, 101]] and layers.finished and store.put_all == 0 and not store.aborted
    assert counted(c) == {"saved_chunks_layerwise": 2, "saved_chunks": 2}
    c.clear_connector_metadata()
    step(c)  # the next step begins its own save
    forward(c)
    c.wait_for_save()
    assert len(store.placed) == 2 and store.finished[-1] == [100, 101]


def test_a_step_with_a_layer_missing_fills_the_same_slots_after_the_forward(fake_layers: type[FakeLayers]) -> None:
    store = FakeStore()
    c = connector(store)
    step(c)
    forward(c, LAYERS[:2])
    c.wait_for_save()
    assert fake_layers.instances[0].cancelled and not fake_layers.instances[0].finished
    assert c._extracted == [[bytes([0]) * 16, bytes([1]) * 16]]  # type: ignore[attr-defined]
    assert store.finished == [[7, 7]] and len(store.placed) == 1 and store.put_all == 0
    assert counted(c)["layerwise_save_fallbacks"] == 1


def test_a_step_without_save_kv_layer_calls_takes_todays_path(fake_layers: type[FakeLayers]) -> None:
    store = FakeStore()  # e.g. a forward replayed from a full CUDA graph: no per-layer hooks
    c = connector(store)
    step(c)
    c.wait_for_save()
    assert store.put_all == 1 and not store.placed and counted(c) == {"saved_chunks": 2}


def test_a_failed_step_gives_its_slots_back_and_saves_nothing(fake_layers: type[FakeLayers]) -> None:
    store = FakeStore()
    c = connector(store)
    step(c)
    forward(c, LAYERS[:1])
    try:
        raise RuntimeError("the forward raised")
    except RuntimeError:
        c.wait_for_save()  # vLLM calls it from a `finally`: sys.exc_info() is the forward's error
    assert sys.exc_info()[1] is None
    assert store.aborted == store.placed and not store.finished and fake_layers.instances[0].cancelled
    assert counted(c) == {"save_failures": 2}


def test_a_failing_hash_aborts_the_slots(fake_layers: type[FakeLayers]) -> None:
    store = FakeStore()
    c = connector(store)
    step(c)
    forward(c)
    fake_layers.instances[0].fail_finish = True
    c.wait_for_save()  # never raises into the engine
    assert store.aborted == store.placed and not store.finished
    assert counted(c) == {"save_failures": 2}


def test_a_step_never_waited_for_is_aborted_by_the_next_one(fake_layers: type[FakeLayers]) -> None:
    store = FakeStore()  # vLLM 0.26's V2 runner waits for the save after sampling, not in a `finally`
    c = connector(store)
    step(c)
    forward(c)
    step(c)  # the forward raised: no wait_for_save; the next step binds its plan
    assert store.aborted == store.placed[:1] and fake_layers.instances[0].cancelled
    forward(c)
    c.wait_for_save()
    assert len(store.placed) == 2 and store.finished == [[100, 101]]


def test_shutdown_mid_step_aborts(fake_layers: type[FakeLayers]) -> None:
    store = FakeStore()
    c = connector(store)
    c._tier = c._tier_reader = None
    c._gpu = SimpleNamespace(close=lambda: None, gpu_checksums=True)
    c._store.close = lambda: None  # type: ignore[attr-defined]
    step(c)
    forward(c, LAYERS[:1])
    c.shutdown()
    assert store.aborted == store.placed


def test_a_placement_that_fails_leaves_the_step_to_todays_path(fake_layers: type[FakeLayers]) -> None:
    store = FakeStore(place_error=ConnectionError("agent gone"))
    c = connector(store)
    step(c)
    forward(c)  # never raises into the forward; tried once per step, not per layer
    assert counted(c) == {"layerwise_save_fallbacks": 1}
    c.wait_for_save()
    assert store.put_all == 1 and not fake_layers.instances


def test_a_step_that_cannot_go_layer_by_layer_fills_its_slots_after_the_forward(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    from kvstore import gpu_layerwise

    def unavailable(*a: Any) -> None:
        raise gpu_layerwise.LayerwiseUnavailable("slots in 9 runs")

    monkeypatch.setattr(gpu_layerwise, "LayerwiseSave", unavailable)
    store = FakeStore()
    c = connector(store)
    step(c)
    forward(c)
    c.wait_for_save()
    assert store.finished == [[7, 7]] and len(store.placed) == 1 and not store.aborted
    assert counted(c)["layerwise_save_fallbacks"] == 1


def test_the_switch_off_keeps_todays_path(fake_layers: type[FakeLayers]) -> None:
    store = FakeStore()
    c = connector(store, layerwise=False)
    step(c)
    forward(c)
    c.wait_for_save()
    assert store.put_all == 1 and not store.placed and not fake_layers.instances


def test_a_step_saving_less_than_the_minimum_is_saved_after_the_forward(fake_layers: type[FakeLayers]) -> None:
    store = FakeStore()
    c = connector(store)
    c._layerwise_min_bytes = 3 * NBYTES
    step(c, n_saves=2)  # 2 chunks: under the minimum
    forward(c)
    c.wait_for_save()
    assert store.put_all == 1 and not store.placed and not fake_layers.instances
    c.clear_connector_metadata()
    step(c, n_saves=3)  # 3 chunks: layer by layer
    forward(c)
    c.wait_for_save()
    assert len(store.placed) == 1 and store.finished == [[100, 101, 102]]


def test_layerwise_minimum_is_parsed_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_LAYERWISE_SAVE_MIN_MIB", raising=False)
    assert connmod.layerwise_min_bytes() == 64 << 20
    monkeypatch.setenv("PDSERVE_LAYERWISE_SAVE_MIN_MIB", "0")
    assert connmod.layerwise_min_bytes() == 0
    for bad in ("-1", "1.5", "32M", ""):
        monkeypatch.setenv("PDSERVE_LAYERWISE_SAVE_MIN_MIB", bad)
        with pytest.raises(ValueError, match="PDSERVE_LAYERWISE_SAVE_MIN_MIB"):
            connmod.layerwise_min_bytes()


def test_layerwise_switch_is_parsed_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_LAYERWISE_SAVE", raising=False)
    assert connmod.layerwise_save_enabled()
    for raw, want in (("0", False), ("off", False), ("False", False), ("1", True), (" yes ", True)):
        monkeypatch.setenv("PDSERVE_LAYERWISE_SAVE", raw)
        assert connmod.layerwise_save_enabled() is want, raw
    monkeypatch.setenv("PDSERVE_LAYERWISE_SAVE", "O")
    with pytest.raises(ValueError, match="PDSERVE_LAYERWISE_SAVE"):
        connmod.layerwise_save_enabled()


def test_a_cpu_engine_registers_without_the_layer_wise_save() -> None:
    c = object.__new__(PDStoreConnector)
    c._num_blocks = 4
    c._layerwise = False
    caches = {name: torch.zeros(4, 2, 8) for name in LAYERS}
    c.register_kv_caches(caches)
    assert c._gpu is None if hasattr(c, "_gpu") else True
    assert not c._layerwise and c._layer_index == {name: i for i, name in enumerate(LAYERS)}
