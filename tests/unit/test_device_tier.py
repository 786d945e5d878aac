"""The device tier (kvstore/transport/cuda_ipc.py) without a GPU: its ring and the keys it
names for deletion, its Redis records (real Redis), the reader's choice of what to pull and
from where (the CUDA IPC open replaced by a fake), the connector's merge of the tier and the
store path, the config reaching the connector, and, under Triton's interpreter with CUDA
streams as no-ops, the save into slots and the verified load back out of them. The IPC pull
itself runs on a GPU: tests/gpu/test_device_tier_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from kvstore.metadata import ChunkLocation, MetadataStore, connect, tier_mapping_name, tier_owner_name  # noqa: E402
from kvstore.transport.cuda_ipc import (  # noqa: E402
    MAPPING_TTL_S,
    RECORD_TTL_S,
    DeviceTier,
    OwnerRecord,
    SlotRing,
    TierMapping,
    TierReader,
    slot_runs,
)
from tests.unit.cuda_stubs import CUDA_AS_NO_OPS  # noqa: E402

NODE = "node-a"
HANDLE = (0, b"\x01" * 64, 4096, 0, b"/torch_123_456", 7, b"\x02" * 64, True)


@pytest.fixture
def meta(redis_url: str, prefix: str) -> Iterator[MetadataStore]:
    store = MetadataStore(connect(redis_url), prefix)
    yield store
    for name in store.client.scan_iter(f"{prefix}:*"):
        store.client.delete(name)


def loc(checksum: int, node: str = NODE) -> ChunkLocation:
    return ChunkLocation(node, "seg", 0, 4, checksum)


def tier(meta: MetadataStore, n_slots: int = 3, slot_bytes: int = 4) -> DeviceTier:
    return DeviceTier(meta, NODE, torch.zeros(n_slots * slot_bytes, dtype=torch.uint8), slot_bytes, HANDLE, "GPU-x")


def chunks(*values: int, size: int = 4) -> Any:
    """Chunks back to back, chunk i all ``values[i]``: staging as extract_many leaves it."""
    return torch.tensor([v for v in values for _ in range(size)], dtype=torch.uint8)


def mapping(meta: MetadataStore, key: bytes) -> TierMapping | None:
    raw = meta.client.get(tier_mapping_name(meta.prefix, key))
    return None if raw is None else TierMapping.decode(raw)


# -- the ring --------------------------------------------------------------------------------


def test_the_ring_hands_out_the_oldest_slots_and_names_the_keys_it_reused() -> None:
    ring = SlotRing(3)
    slots, evicted = ring.take(2)
    assert (slots, evicted) == ([0, 1], [])
    ring.bind(0, b"k0", b"m0")
    ring.bind(1, b"k1", b"m1")
    slots, evicted = ring.take(2)  # wraps: slot 2 was never bound, slot 0 held k0
    assert (slots, evicted) == ([2, 0], [(b"k0", b"m0")])
    assert ring.bound() == [(b"k1", b"m1")]
    assert ring.take(5)[0] == [1, 2, 0]  # never more than one ring at once
    assert ring.take(0) == ([], [])
    with pytest.raises(ValueError):
        SlotRing(0)


def test_slot_runs_are_one_copy_unless_the_ring_wraps() -> None:
    assert slot_runs([4, 5, 6]) == [(4, 0, 3)]
    assert slot_runs([6, 7, 0, 1]) == [(6, 0, 2), (0, 2, 2)]
    assert slot_runs([]) == []


def test_adjacent_device_sources_are_one_copy() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    from kvstore.gpu_path import _spanning, device_runs

    ring = torch.arange(40, dtype=torch.uint8)
    slots = [ring[a : a + 8] for a in (8, 16, 24, 0, 32)]  # a ring's take that wrapped, then one more
    assert device_runs(slots, 8) == [(0, 3), (3, 4), (4, 5)]
    assert torch.equal(_spanning(slots[0], 24), ring[8:32])
    assert device_runs([ring[0:8], torch.zeros(8, dtype=torch.uint8)], 8) == [(0, 1), (1, 2)]  # other storage
    assert device_runs([], 8) == []


def test_mappings_and_owner_records_round_trip_through_msgpack() -> None:
    m = TierMapping("n:1:ab", NODE, 7, 2**64 - 1)
    assert TierMapping.decode(m.encode()) == m
    rec = OwnerRecord("n:1:ab", NODE, 1234, "GPU-x", 1 << 20, 512, HANDLE)
    assert OwnerRecord.decode(rec.encode()) == rec  # bytes stay bytes, the bool stays a bool


# -- the owner -------------------------------------------------------------------------------


def test_a_save_names_its_slots_and_a_reused_slot_loses_its_mapping(meta: MetadataStore) -> None:
    t = tier(meta)
    t.stage(chunks(1, 2), 2, 4)
    assert t.publish([b"k0", b"k1"], [10, 11]) == 2
    assert bytes(t.buffer[:8]) == bytes(chunks(1, 2))
    assert mapping(meta, b"k0") == TierMapping(t.owner, NODE, 0, 10)
    assert 0 < meta.client.ttl(tier_mapping_name(meta.prefix, b"k0")) <= MAPPING_TTL_S
    record = meta.client.get(tier_owner_name(meta.prefix, t.owner))
    assert record is not None and OwnerRecord.decode(record).n_slots == 3
    assert 0 < meta.client.ttl(tier_owner_name(meta.prefix, t.owner)) <= RECORD_TTL_S
    # another owner saved k1 since: its mapping is no longer ours to delete
    other = TierMapping("other", NODE, 5, 11).encode()
    meta.client.set(tier_mapping_name(meta.prefix, b"k1"), other)
    t.stage(chunks(3, 4, 5), 3, 4)  # slots 2, 0, 1: k0's and k1's slots reused
    assert t.publish([b"k2", b"k3", b"k4"], [12, 13, None]) == 2  # no checksum, no mapping
    assert mapping(meta, b"k0") is None
    assert meta.client.get(tier_mapping_name(meta.prefix, b"k1")) == other
    assert mapping(meta, b"k3") == TierMapping(t.owner, NODE, 0, 13) and mapping(meta, b"k4") is None
    assert bytes(t.buffer) == bytes(chunks(4, 5, 3))
    t.close()
    assert meta.client.get(tier_owner_name(meta.prefix, t.owner)) is None
    assert mapping(meta, b"k2") is None and mapping(meta, b"k3") is None
    assert meta.client.get(tier_mapping_name(meta.prefix, b"k1")) == other


def test_a_save_stages_at_most_one_ring_and_a_failed_save_is_forgotten(meta: MetadataStore) -> None:
    t = tier(meta)
    t.stage(chunks(1, 2), 2, 4)  # staging groups of one save
    t.stage(chunks(3, 4), 2, 4)  # only one slot left for this save
    assert t.publish([b"a", b"b", b"c", b"d"], [1, 2, 3, 4]) == 3
    assert mapping(meta, b"c") == TierMapping(t.owner, NODE, 2, 3) and mapping(meta, b"d") is None
    t.stage(chunks(9), 1, 4)
    t.abandon()
    assert t.publish([b"e"], [5]) == 0 and mapping(meta, b"e") is None
    t.stage(chunks(1, 2), 2, 8)  # another chunk size: not this tier's
    assert t.publish([b"f"], [6]) == 0


def test_a_live_owner_keeps_its_record_and_withdraws_it_on_close(meta: MetadataStore) -> None:
    import threading
    import time

    t = tier(meta)
    t._renewer = threading.Thread(target=t._renew, daemon=True)  # what allocate starts
    t._renewer.start()
    name = tier_owner_name(meta.prefix, t.owner)
    deadline = time.monotonic() + 5
    while meta.client.get(name) is None:
        assert time.monotonic() < deadline, "the record was never written"
        time.sleep(0.01)
    assert 0 < meta.client.ttl(name) <= RECORD_TTL_S
    t.close()
    assert not t._renewer.is_alive() and meta.client.get(name) is None


# -- the reader ------------------------------------------------------------------------------


class Opener:
    """Stands in for the CUDA IPC open: a CPU buffer per record, or a failure."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.opened: list[OwnerRecord] = []

    def __call__(self, rec: OwnerRecord) -> Any:
        self.opened.append(rec)
        if self.fail:
            raise RuntimeError("cudaIpcOpenMemHandle: invalid handle")
        return torch.arange(rec.n_slots * rec.slot_bytes, dtype=torch.int64).to(torch.uint8)


def publish_owner(meta: MetadataStore, owner: str, pid: int = 1, n_slots: int = 3, node: str = NODE) -> bytes:
    raw = OwnerRecord(owner, node, pid, "GPU-x", 4, n_slots, HANDLE).encode()
    meta.client.set(tier_owner_name(meta.prefix, owner), raw)
    return raw


def publish_mapping(meta: MetadataStore, key: bytes, owner: str, slot: int, checksum: int, node: str = NODE) -> None:
    meta.client.set(tier_mapping_name(meta.prefix, key), TierMapping(owner, node, slot, checksum).encode())


def test_the_reader_pulls_only_this_nodes_copies_of_the_checksum_it_looked_up(meta: MetadataStore) -> None:
    publish_owner(meta, "p")
    publish_mapping(meta, b"k0", "p", 2, 10)
    publish_mapping(meta, b"k1", "p", 0, 11, node="node-b")  # another node's GPU
    publish_mapping(meta, b"k2", "p", 1, 99)  # another save's bytes
    publish_mapping(meta, b"k4", "p", 3, 14)  # past the owner's ring
    meta.client.set(tier_mapping_name(meta.prefix, b"k5"), b"\xc1junk")
    opener = Opener()
    reader = TierReader(meta, NODE, opener)
    keys = [b"k0", b"k1", b"k2", b"k3", b"k4", b"k5"]
    found = reader.sources(keys, [loc(10), loc(11), loc(12), loc(13), loc(14), loc(15)], 4)
    assert found.idx == [0] and found.failed == 1  # k4: a mapping worth a pull, no slot for it
    assert bytes(found.srcs[0]) == bytes(range(8, 12))  # slot 2 of the owner's buffer
    assert len(opener.opened) == 1
    reader.sources(keys, [loc(10)] * 6, 4)
    assert len(opener.opened) == 1  # opened once per record
    assert reader.sources(keys, [loc(10)] * 6, 8).failed == 1  # another chunk size: nothing to pull


def test_a_restarted_owner_is_reopened_and_a_vanished_one_falls_back(meta: MetadataStore) -> None:
    publish_owner(meta, "p", n_slots=3)
    publish_mapping(meta, b"k0", "p", 0, 10)
    opener = Opener()
    reader = TierReader(meta, NODE, opener)
    assert reader.sources([b"k0"], [loc(10)], 4).idx == [0]
    publish_owner(meta, "p", pid=2, n_slots=4)  # its record changed: another buffer
    assert reader.sources([b"k0"], [loc(10)], 4).idx == [0]
    assert [r.pid for r in opener.opened] == [1, 2]
    meta.client.delete(tier_owner_name(meta.prefix, "p"))
    found = reader.sources([b"k0"], [loc(10)], 4)
    assert found.idx == [] and found.failed == 1
    assert reader._opened == {}  # its buffer unmapped


def test_an_owner_that_does_not_open_falls_back_without_retrying(meta: MetadataStore) -> None:
    publish_owner(meta, "p")
    publish_owner(meta, "me", pid=os.getpid())  # a record of this very process, not its own tier
    publish_mapping(meta, b"k0", "p", 0, 10)
    publish_mapping(meta, b"k1", "me", 0, 11)
    opener = Opener(fail=True)
    reader = TierReader(meta, NODE, opener)
    for _ in range(2):
        found = reader.sources([b"k0", b"k1"], [loc(10), loc(11)], 4)
        assert found.idx == [] and found.failed == 2
    assert [r.owner for r in opener.opened] == ["p"]  # tried once; this process's record never


def test_this_processes_own_tier_is_read_directly(meta: MetadataStore) -> None:
    own = tier(meta)
    own.stage(chunks(7, 8), 2, 4)
    own.publish([b"k0", b"k1"], [10, 11])
    opener = Opener()
    reader = TierReader(meta, NODE, opener, own=own)
    found = reader.sources([b"k0", b"k1"], [loc(10), loc(11)], 4)
    assert found.idx == [0, 1] and opener.opened == []
    assert [bytes(s) for s in found.srcs] == [bytes(chunks(7)), bytes(chunks(8))]


# -- the connector ---------------------------------------------------------------------------


class FakeTierReader:
    def __init__(self, idx: list[int], failed: int = 0, error: Exception | None = None) -> None:
        self.idx, self.failed, self.error = idx, failed, error

    def sources(self, keys: list[bytes], locs: list[ChunkLocation], chunk_bytes: int) -> Any:
        if self.error is not None:
            raise self.error
        return SimpleNamespace(idx=self.idx, srcs=[f"slot{i}" for i in self.idx], failed=self.failed)


def connector(reader: FakeTierReader, matched: list[bool], store_ok: bool = True) -> Any:
    from kvstore.connector import PDStoreConnector
    from kvstore.connector_plan import StepPlanner

    c = object.__new__(PDStoreConnector)
    c._tier_reader, c._counters, c._tier_warned = reader, {}, set()
    c._planner = StepPlanner(32, 32, save=True)
    c._blocks = [torch.zeros(8, 16)]
    c.to_store = []

    def load_from_device(srcs: list[str], checksums: list[int], targets: list[Any], per: int) -> list[bool]:
        assert len(srcs) == len(checksums) == len(targets) == len(matched)
        return matched

    def self_verified(keys: list[bytes], locs: list[Any], check: Any, on_chunk: Any) -> list[bool]:
        c.to_store.append(list(keys))
        return [store_ok] * len(keys)

    c._gpu = SimpleNamespace(load_from_device=load_from_device, gpu_checksums=True)
    c._store = SimpleNamespace(batch_get_self_verified=self_verified)
    return c


def items(n: int) -> list[Any]:
    from kvstore.connector_plan import LoadItem

    return [LoadItem(bytes([i]), loc(10 + i), (i,), 0) for i in range(n)]


def test_the_tier_serves_what_matches_and_the_store_path_the_rest() -> None:
    c = connector(FakeTierReader([0, 2, 3], failed=1), [True, True, False])
    assert c._load(items(5)) == [True] * 5
    assert c.to_store == [[b"\x01", b"\x03", b"\x04"]]  # not in the tier, failed its checksum, not in the tier
    assert c._counters == {"loaded_chunks_device": 2, "device_tier_fallbacks": 2}


def test_a_failing_tier_leaves_every_chunk_to_the_store_path() -> None:
    c = connector(FakeTierReader([], error=ConnectionError("redis gone")), [], store_ok=False)
    assert c._load(items(2)) == [False, False]  # neither path: recomputed by vLLM
    assert c.to_store == [[b"\x00", b"\x01"]]
    assert c._counters == {"device_tier_errors": 1}


def test_a_failed_tier_publish_costs_the_tier_copy_not_the_save() -> None:
    from kvstore.connector import PDStoreConnector
    from kvstore.connector_plan import SaveItem

    class BrokenTier:
        abandoned = 0

        def stage(self, flat: Any, n: int, cb: int) -> None: ...

        def publish(self, keys: list[bytes], checksums: list[int | None]) -> int:
            raise ConnectionError("redis gone")

        def abandon(self) -> None:
            self.abandoned += 1

    c = object.__new__(PDStoreConnector)
    c._tier, c._counters, c._tier_warned = BrokenTier(), {}, set()
    c._gpu = SimpleNamespace(extract_many_staged=lambda ids, payloads, on_staged: [5] * len(payloads))
    saves = [SaveItem(b"a", (0,)), SaveItem(b"b", (1,)), SaveItem(b"c", (2,))]
    assert c._extract_all(saves, [memoryview(b"x"), memoryview(b"y")]) == [5, 5]  # the placed two
    assert c._tier.abandoned == 1 and c._counters == {"device_tier_errors": 1}


# -- the config ------------------------------------------------------------------------------


def test_gpu_tier_mb_reaches_the_connector_settings(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from cluster.app import engine_spec
    from cluster.config import ClusterConfig
    from kvstore.connector import ConnectorSettings

    cfg = ClusterConfig.load(None, ["kvstore.gpu_tier_mb=512"])
    for role in ("prefill", "decode"):
        assert engine_spec(cfg, getattr(cfg, role), role, tmp_path, "redis://127.0.0.1:1").store_gpu_tier_mb == 512
    assert ClusterConfig().kvstore.gpu_tier_mb == 0
    with pytest.raises(ValidationError):
        ClusterConfig.load(None, ["kvstore.gpu_tier_mb=-1"])
    vllm_config = SimpleNamespace(cache_config=SimpleNamespace(block_size=32),
                                  model_config=SimpleNamespace(model="m", dtype="float32"),
                                  device_config=SimpleNamespace(device_type="cuda"))
    extra = {"redis_url": "redis://x", "node_id": NODE}
    assert ConnectorSettings.parse({**extra, "gpu_tier_mb": 512}, vllm_config).gpu_tier_mb == 512  # type: ignore[arg-type]
    assert ConnectorSettings.parse(extra, vllm_config).gpu_tier_mb == 0  # type: ignore[arg-type]


# -- the copies, under Triton's interpreter --------------------------------------------------

_TIER_CHECK = CUDA_AS_NO_OPS + """
import contextlib, gc, uuid
import torch

from kvstore import gpu_path, segment as segmod
from kvstore.segment import HEADER_BYTES, Segment
from kvstore.transport.cuda_ipc import DeviceTier
gpu_path._gpu_checksums_work = lambda device: True

torch.manual_seed(0)
layers, per, n, row = 2, 2, 5, 1024
blocks = [torch.randn(4 * n * per, row).to(torch.bfloat16) for _ in range(layers)]
path = gpu_path.GpuKVPath(blocks)
cb = layers * per * row * 2
gpu_path.GROUP_BYTES = 2 * cb  # staging groups of two chunks: three groups
tier = DeviceTier(None, "n", torch.zeros(4 * cb, dtype=torch.uint8), cb, (), "")
seg = Segment.create(f"pdkv-test-{uuid.uuid4().hex[:8]}", 1 << 20)
try:
    payloads = [seg.payload(c * (HEADER_BYTES + cb), cb) for c in range(n)]
    src = [tuple(range(c * per, (c + 1) * per)) for c in range(n)]
    dig = path.extract_many_staged(src, payloads, tier.stage)
    assert dig == [segmod.checksum(p) for p in payloads]
    assert tier._staged == [0, 1, 2, 3], tier._staged  # one ring: the fifth chunk is not in the tier
    for c in range(4):
        assert bytes(tier.buffer[c * cb:(c + 1) * cb].numpy()) == bytes(payloads[c]), c
    dst = [tuple(range(2 * n * per + c * per, 2 * n * per + (c + 1) * per)) for c in range(4)]
    before = [b.clone() for b in blocks]
    tier.buffer[cb + 5] ^= 0xFF  # slot 1 rewritten by its owner meanwhile
    srcs = [tier.buffer[c * cb:(c + 1) * cb] for c in range(4)]
    targets = [(dst[0][1:], 1)] + [(d, 0) for d in dst[1:]]
    ok = path.load_from_device(srcs, dig[:4], targets, per)
    assert ok == [True, False, True, True], ok
    for b, was in zip(blocks, before):
        assert torch.equal(b[list(dst[0][1:])], was[list(src[0][1:])])
        assert torch.equal(b[list(dst[1])], was[list(dst[1])]), "a chunk that failed its checksum was written"
        for c in (2, 3):
            assert torch.equal(b[list(dst[c])], was[list(src[c])])
finally:
    payloads = path = srcs = None
    gc.collect()
    with contextlib.suppress(BufferError):  # a view outlived a failure: the mapping goes with it, the file now
        seg.close()
print("OK")
"""


def test_a_save_fills_the_tier_and_a_load_from_it_keeps_only_the_chunks_that_verify() -> None:
    """GpuKVPath.extract_many_staged with DeviceTier.stage, then load_from_device from the
    tier's slots, on CPU tensors under Triton's interpreter (a child process): the tier holds
    the saved bytes (one ring's worth of a request split into staging groups), a slot rewritten
    under the reader fails its checksum and writes nothing, the others land in their blocks."""
    pytest.importorskip("triton", reason="triton is not installed")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, "-c", _TIER_CHECK], cwd=root, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]
