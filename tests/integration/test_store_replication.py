"""Hot-chunk replication (``kvstore/replication.py``) with real Redis, two real agents on
loopback and real shared memory: a chunk node B keeps pulling from node A gets a replica on B,
B's reads then come from its own segment, and the replica lives and dies as B's chunk."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvstore.client import ChunkToSave, StoreClient
from kvstore.metadata import ChunkLocation, MetadataStore, connect

from .conftest import AgentFactory
from .test_transport_contract import content, make_key

SIZES = [64 << 10, 64 << 10, 3 << 20, 4096]  # small slots and one of several checksum blocks


def _save(c: StoreClient, keys: list[bytes]) -> None:
    chunks = [ChunkToSave(k, n) for k, n in zip(keys, SIZES, strict=True)]
    assert c.batch_put(chunks, lambda i, v: v.__setitem__(slice(None), content(keys[i], len(v)))) == len(keys)


def _read(c: StoreClient, keys: list[bytes]) -> list[ChunkLocation]:
    """Get every chunk through ``c`` and check its bytes; returns where they were read from."""
    locs = c.lookup(keys)
    assert all(locs), "a chunk is missing"
    got: dict[int, bytes] = {}
    assert c.batch_get(keys, locs, lambda i, p: got.__setitem__(i, bytes(p))) == [True] * len(keys)  # type: ignore[arg-type]
    assert all(got[i] == content(k, SIZES[i]) for i, k in enumerate(keys))
    return locs  # type: ignore[return-value]


def _replicated(nodes: tuple, tag: str) -> list[bytes]:  # type: ignore[type-arg]
    """Chunks saved on A and read twice from B, so B holds replicas of them; their keys."""
    _a, b, writer, reader = nodes
    keys = [make_key(tag, i) for i in range(len(SIZES))]
    _save(writer, keys)
    for _ in range(2):
        _read(reader, keys)
    assert reader.replicas_settled() and b.snapshot().replicas == len(keys)
    return keys


@pytest.fixture
def nodes(make_agent: AgentFactory, redis_url: str, prefix: str):  # type: ignore[no-untyped-def]
    a, b = make_agent("node-A"), make_agent("node-B")
    writer = StoreClient(redis_url, prefix, "node-A")
    reader = StoreClient(redis_url, prefix, "node-B", replicate_after=2)
    yield a, b, writer, reader
    writer.close()
    reader.close()


def test_a_chunk_pulled_twice_from_another_node_gets_a_replica_there_and_is_then_read_locally(
    nodes, redis_url: str, prefix: str,  # type: ignore[no-untyped-def]
) -> None:
    _a, b, writer, reader = nodes
    keys = [make_key("hot", i) for i in range(len(SIZES))]
    _save(writer, keys)
    meta = MetadataStore(connect(redis_url), prefix)
    after = meta.stream_bounds()
    assert {loc.node_id for loc in _read(reader, keys)} == {"node-A"}
    assert reader.replicas_settled() and b.snapshot().replicas == 0  # one pull is not hot

    assert {loc.node_id for loc in _read(reader, keys)} == {"node-A"}  # the second pull makes them hot
    assert reader.replicas_settled()
    counters = reader.drain_counters()
    assert counters["replicated_chunks"] == len(keys) and "replication_failures" not in counters
    assert b.snapshot().replicas == len(keys)

    # Node B now reads its own replicas, verified, from shared memory ...
    assert {loc.node_id for loc in _read(reader, keys)} == {"node-B"}
    assert reader.drain_counters()["loaded_local_chunks"] == len(keys)
    # ... while the committed copies stay on A, the ones every other node reads.
    assert {loc.node_id for loc in meta.lookup(keys) if loc} == {"node-A"}
    other = StoreClient(redis_url, prefix, "node-C")
    assert {loc.node_id for loc in other.lookup(keys) if loc} == {"node-A"}
    other.close()
    # The router's store index hears of B's copies as it hears of any save.
    assert after is not None
    stored_by_b = [e for e in meta.read_events(after[1]) if e.op == "stored" and e.node_id == "node-B"]
    assert sorted(k for e in stored_by_b for k in e.keys) == sorted(keys)
    assert set(meta.node_chunk_keys("node-B")) == set(keys)


def test_a_replica_outlives_its_source_and_goes_with_its_own_node(nodes, redis_url: str, prefix: str) -> None:  # type: ignore[no-untyped-def]
    a, b, _writer, reader = nodes
    keys = _replicated(nodes, "outlive")

    assert a.clear() == len(keys)  # the committed copies go (evicted, node A restarted, ...)
    meta = MetadataStore(connect(redis_url), prefix)
    assert meta.lookup(keys) == [None] * len(keys)
    assert {loc.node_id for loc in _read(reader, keys)} == {"node-B"}  # B still has its own

    assert b.clear() == len(keys)  # B evicts them: its replica names go, compared and deleted
    assert reader.lookup(keys) == [None] * len(keys)
    assert meta.node_chunk_keys("node-B") == []


def test_a_departed_node_takes_its_replicas_with_it(nodes, redis_url: str, prefix: str) -> None:  # type: ignore[no-untyped-def]
    keys = _replicated(nodes, "gone")
    meta = MetadataStore(connect(redis_url), prefix)
    assert meta.drop_node("node-B") == len(keys)  # what the janitor does for a node that left
    assert [loc.node_id for loc in meta.lookup(keys, near="node-B") if loc] == ["node-A"] * len(keys)


def test_replicas_are_republished_as_replicas_after_redis_forgets_them(nodes, redis_url: str, prefix: str) -> None:  # type: ignore[no-untyped-def]
    a, b, _writer, _reader = nodes
    keys = _replicated(nodes, "republish")
    r = connect(redis_url)
    for name in r.scan_iter(f"{prefix}:*"):  # this store's keys, as a restarted Redis lost them
        r.delete(name)
    b.tick()
    a.tick()  # each agent sees it was forgotten and publishes what it holds
    meta = MetadataStore(connect(redis_url), prefix)
    assert {loc.node_id for loc in meta.lookup(keys) if loc} == {"node-A"}  # A's stay the committed copies
    assert {loc.node_id for loc in meta.lookup(keys, near="node-B") if loc} == {"node-B"}


def test_a_pull_whose_bytes_do_not_verify_commits_no_replica_and_frees_its_slots(nodes) -> None:  # type: ignore[no-untyped-def]
    _a, b, writer, reader = nodes
    keys = [make_key("bad", i) for i in range(len(SIZES))]
    _save(writer, keys)
    locs = reader.lookup(keys)
    wrong = [replace(loc, checksum=loc.checksum ^ 1) if i % 2 else loc for i, loc in enumerate(locs) if loc]
    replicator = reader._replicator
    assert replicator is not None
    replicator._replicate(list(zip(keys, wrong, strict=True)))  # the thread's own step, run here
    assert reader.drain_counters() == {"replicated_chunks": 2, "replication_failures": 2}
    snap = b.snapshot()
    assert snap.replicas == 2 and snap.pending == 0  # the two that failed gave their slots back
    near = reader.lookup(keys)
    assert [loc.node_id for loc in near if loc] == ["node-B", "node-A", "node-B", "node-A"]
