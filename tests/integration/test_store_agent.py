"""The store's byte path with real Redis, real gRPC and real shared memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvstore.agent import StoreAgent
from kvstore.agent_rpc import AgentClient, serve
from kvstore.client import ChunkToSave, StoreClient
from kvstore.segment import HEADER_BYTES, SlotCorrupt


@pytest.fixture
def agent(redis_url: str, prefix: str) -> Iterator[StoreAgent]:
    a = StoreAgent("node-A", redis_url, 8 * (HEADER_BYTES + 4096), prefix)
    server, port = serve(a, "127.0.0.1")
    a.address = f"127.0.0.1:{port}"
    a.register()
    yield a
    server.stop(0)
    a.close()


def payload(i: int) -> bytes:
    return bytes([i % 256]) * 4096


def save(client: StoreClient, ks: list[bytes]) -> int:
    def fill(i: int, view: memoryview) -> None:
        view[:] = payload(i)

    return client.save([ChunkToSave(k, 4096) for k in ks], fill)


def test_save_then_load_same_node(agent: StoreAgent, redis_url: str, prefix: str) -> None:
    c = StoreClient(redis_url, prefix, "node-A")
    ks = [bytes([i]) * 16 for i in range(3)]
    assert save(c, ks) == 3
    locs = c.lookup_prefix(ks)
    got: list[bytes] = []
    for k, loc in zip(ks, locs, strict=True):
        c.load(k, loc, lambda p: got.append(bytes(p)))
    assert got == [payload(i) for i in range(3)]
    c.close()


def test_remote_node_pulls_through_the_agent(agent: StoreAgent, redis_url: str, prefix: str) -> None:
    writer, reader = StoreClient(redis_url, prefix, "node-A"), StoreClient(redis_url, prefix, "node-B")
    k = b"r" * 16
    save(writer, [k])
    got: list[bytes] = []
    reader.load(k, reader.lookup_prefix([k])[0], lambda p: got.append(bytes(p)))
    assert got == [payload(0)] and agent.snapshot().bytes_read_remote == HEADER_BYTES + 4096
    writer.close()
    reader.close()


def test_full_segment_evicts_oldest_and_stale_readers_see_a_mismatch(
    agent: StoreAgent, redis_url: str, prefix: str
) -> None:
    c = StoreClient(redis_url, prefix, "node-A")
    old = [bytes([i]) * 16 for i in range(8)]
    save(c, old)
    stale = c.lookup_prefix(old[:1])[0]
    new = [bytes([100 + i]) * 16 for i in range(3)]
    assert save(c, new) == 3
    snap = agent.snapshot()
    assert snap.evicted == 3 and snap.chunks == 8
    assert c.lookup_prefix(old[:1]) == []  # evicted chunks leave Redis first
    with pytest.raises(SlotCorrupt):  # and a reader holding an old location never gets new bytes
        c.load(old[0], stale, lambda p: None)
    c.close()


def test_failed_fill_releases_the_slots(agent: StoreAgent, redis_url: str, prefix: str) -> None:
    c = StoreClient(redis_url, prefix, "node-A")

    def boom(i: int, view: memoryview) -> None:
        raise RuntimeError("engine copy failed")

    with pytest.raises(RuntimeError):
        c.save([ChunkToSave(b"z" * 16, 4096)], boom)
    assert agent.snapshot().pending == 0 and agent.alloc.used_bytes == 0
    c.close()


def test_agent_rpc_errors_are_typed(agent: StoreAgent) -> None:
    from kvstore.agent_rpc import AgentUnavailable

    client = AgentClient(agent.address)
    with pytest.raises(AgentUnavailable):
        client.read(-1, 10)
    client.close()
    with pytest.raises(AgentUnavailable):
        AgentClient("127.0.0.1:1", timeout_s=0.5).stats()
