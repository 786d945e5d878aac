"""The Store Agent's lifecycle with real Redis, real sockets and real shared memory: LRU
eviction that respects leases, TTL, abandoned writes, Redis restarts, and a reader that
loses its agent mid-transfer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.runtime import start_redis, stop_pid, url_password, wait_until
from kvstore.agent import StoreAgent
from kvstore.agent_rpc import AgentClient, AgentUnavailable
from kvstore.client import ChunkToSave, StoreClient
from kvstore.metadata import MetadataStore, connect
from kvstore.peer_auth import PeerAuth
from kvstore.segment import HEADER_BYTES, SlotLocks

from .conftest import AgentFactory
from .test_transport_contract import content, make_key

SLOT = HEADER_BYTES + 4096


def put(c: StoreClient, keys: list[bytes], n: int = 4096) -> int:
    return c.batch_put([ChunkToSave(k, n) for k in keys], lambda i, v: v.__setitem__(slice(None), content(keys[i], n)))


def test_eviction_is_lru_and_skips_pinned_chunks(make_agent: AgentFactory, redis_url: str, prefix: str) -> None:
    agent = make_agent(capacity=4 * SLOT)
    c = StoreClient(redis_url, prefix, "node-A")
    old = [make_key("old", i) for i in range(4)]
    assert put(c, old) == 4
    locs = [loc for loc in c.lookup(old) if loc]
    assert c.batch_get(old[:1], locs[:1], lambda i, p: None) == [True]  # old[0] is used again
    reader = SlotLocks(agent.segment.path)  # another reader, in the middle of copying old[1]
    assert reader.try_shared(locs[1].offset, SLOT)
    assert put(c, [make_key("new", 0)]) == 1
    # old[0] was read (second chance), old[1] is pinned: the least recently used free one goes.
    assert c.batch_exists(old) == [True, True, False, True]
    new0 = c.lookup([make_key("new", 0)])[0]
    assert new0 is not None
    for loc in (locs[0], locs[3], new0):
        assert reader.try_shared(loc.offset, SLOT)  # now every chunk is pinned
    assert put(c, [make_key("new", 1)]) == 0 and agent.snapshot().rejected == 1
    reader.unlock(locs[3].offset, SLOT)
    assert put(c, [make_key("new", 2)]) == 1 and c.batch_exists([old[3]]) == [False]
    reader.close()  # a reader's pins die with its descriptor (or its process)
    assert put(c, [make_key("new", 3)]) == 1
    c.close()


def test_eviction_under_pressure_during_reads_never_serves_wrong_bytes(
    make_agent: AgentFactory, redis_url: str, prefix: str
) -> None:
    agent = make_agent(capacity=16 * (HEADER_BYTES + (64 << 10)))
    stop, wrong, delivered = threading.Event(), [], [0]

    def reader(node: str, transport: str) -> None:
        c = StoreClient(redis_url, prefix, node, transport=transport)
        n = 0
        while not stop.is_set():
            n += 1
            keys = [make_key("p", i) for i in range(n % 40, n % 40 + 4)]
            found = [(k, loc) for k, loc in zip(keys, c.lookup(keys), strict=True) if loc]

            def check(i: int, p: memoryview, found: list = found) -> None:
                if bytes(p) != content(found[i][0], len(p)):
                    wrong.append(i)
                delivered[0] += 1

            c.batch_get([k for k, _ in found], [loc for _, loc in found], check)
        c.close()

    threads = [threading.Thread(target=reader, args=a) for a in (("node-A", "tcp"), ("node-B", "tcp"))]
    for t in threads:
        t.start()
    w = StoreClient(redis_url, prefix, "node-A")
    try:
        for i in range(40):  # 40 chunks through a 16-chunk segment, while both readers read
            # A full segment whose chunks are all leased refuses the write (the engine then
            # just does not store it); here the writer tries again until a lease ends.
            wait_until(lambda i=i: put(w, [make_key("p", i)], 64 << 10) == 1, 10, "room in the segment")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        w.close()
    assert not wrong and delivered[0] > 0
    snap = agent.snapshot()
    assert snap.evicted >= 24 and snap.pinned == 0 and snap.chunks <= 16 and snap.remote_reads > 0


def test_idle_chunks_expire_and_abandoned_writes_are_reclaimed(
    make_agent: AgentFactory, redis_url: str, prefix: str
) -> None:
    agent = make_agent(ttl_s=0.3, pending_timeout_s=0.3)
    c = StoreClient(redis_url, prefix, "node-A")
    keys = [make_key("ttl", i) for i in range(2)]
    put(c, keys)
    writer = AgentClient(agent.address, PeerAuth.for_store(redis_url, prefix))
    abandoned = writer.allocate([4096])  # a writer that died before commit
    assert agent.snapshot().pending == 1
    time.sleep(0.4)
    agent.tick()
    snap = agent.snapshot()
    assert snap.chunks == 0 and snap.expired == 2 and snap.pending == 0 and snap.reclaimed_pending == 1
    assert c.batch_exists(keys) == [False, False] and agent.alloc.used_bytes == 0 and abandoned
    c.close()


def test_redis_restart_loses_nothing_the_agent_holds(make_agent: AgentFactory, prefix: str, tmp_path: Path) -> None:
    url, port, pid = start_redis(tmp_path)
    try:
        agent = StoreAgent("node-A", url, 1 << 20, prefix)
        from kvstore.agent_rpc import AgentServers

        servers = AgentServers(agent, "127.0.0.1", PeerAuth.for_store(url, prefix))
        agent.tick()
        c = StoreClient(url, prefix, "node-B")
        keys = [make_key("rr", i) for i in range(3)]
        assert c.batch_put([ChunkToSave(k, 4096) for k in keys],
                           lambda i, v: v.__setitem__(slice(None), content(keys[i], 4096)), node_id="node-A") == 3
        stop_pid(pid)
        with pytest.raises(Exception):  # noqa: B017 - any client error: Redis is gone
            c.lookup(keys)
        url, port, pid = start_redis(tmp_path, port=port, password=url_password(url))  # back, and empty
        assert c.batch_exists(keys) == [False] * 3
        agent.tick()  # the heartbeat finds its liveness key gone: re-publish
        assert c.batch_exists(keys) == [True] * 3 and agent.snapshot().republished == 3
        got: dict[int, bytes] = {}
        locs = [loc for loc in c.lookup(keys) if loc]
        assert c.batch_get(keys, locs, lambda i, p: got.__setitem__(i, bytes(p))) == [True] * 3
        assert got == {i: content(k, 4096) for i, k in enumerate(keys)}
        c.close()
        servers.stop(0)
        agent.close()
    finally:
        stop_pid(pid)


_AGENT_PROC = """
import sys, time
from kvstore.agent import StoreAgent
from kvstore.agent_rpc import AgentServers
from kvstore.peer_auth import PeerAuth
agent = StoreAgent("node-K", sys.argv[1], 64 << 20, sys.argv[2])
# held: a collected server stops serving
servers = AgentServers(agent, "127.0.0.1", PeerAuth.for_store(sys.argv[1], sys.argv[2]))
agent.tick()
print("ready", flush=True)
time.sleep(600)
"""


def _interrupted_read(redis_url: str, prefix: str, sig: int) -> tuple[StoreClient, list[bytes], list[bool], float]:
    """48 one-MiB chunks (far more than the socket buffers hold) on an agent in its own
    process, read from another node; the agent gets ``sig`` once the first chunk is in.
    Returns the client, the keys, what was delivered and how long the read took; every chunk
    delivered was checked, and nothing after the first failure was delivered."""
    proc = subprocess.Popen([sys.executable, "-c", _AGENT_PROC, redis_url, prefix], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        c = StoreClient(redis_url, prefix, "node-R")
        keys = [make_key(f"sig{sig}", i) for i in range(48)]
        n = 1 << 20
        assert c.batch_put([ChunkToSave(k, n) for k in keys],
                           lambda i, v: v.__setitem__(slice(None), content(keys[i], n)), node_id="node-K") == 48
        locs = [loc for loc in c.lookup(keys) if loc]
        got: list[int] = []

        def on_chunk(i: int, p: memoryview) -> None:
            assert bytes(p) == content(keys[i], n)
            got.append(i)
            if i == 0:
                os.kill(proc.pid, sig)

        started = time.monotonic()
        ok = c.batch_get(keys, locs, on_chunk)
        took = time.monotonic() - started
        first_bad = ok.index(False)
        assert 1 <= first_bad < 48 and not any(ok[first_bad:]) and got == list(range(first_bad))
        assert c.drain_counters()["get_failures"] == 48 - first_bad
        if sig == signal.SIGSTOP:  # it answers again: a new connection reads everything
            os.kill(proc.pid, signal.SIGCONT)
            assert all(c.batch_get(keys, [loc for loc in c.lookup(keys) if loc], lambda i, p: None))
        return c, keys, ok, took
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
        MetadataStore(connect(redis_url), prefix).unregister_agent("node-K")
        from kvstore.agent import reap_orphan_segments

        reap_orphan_segments()  # the killed agent's segment


def test_agent_killed_mid_transfer_fails_the_rest_fast_and_keeps_the_prefix(redis_url: str, prefix: str) -> None:
    c, _keys, _ok, took = _interrupted_read(redis_url, prefix, signal.SIGKILL)
    assert took < 10  # a deadline, not a hang
    c.close()


def test_agent_stalled_mid_transfer_fails_the_rest_within_the_time_limit(redis_url: str, prefix: str) -> None:
    """A peer that stops answering (SIGSTOP: its socket stays open) is cut off by the kernel's
    receive time limit on the tcp transport's blocking socket, not waited on forever."""
    c, _keys, _ok, took = _interrupted_read(redis_url, prefix, signal.SIGSTOP)
    assert took < 15, f"a stalled peer held the read for {took:.1f} s"  # the limit is 5 s a call
    c.close()


def test_agent_rpc_errors_are_typed(make_agent: AgentFactory, redis_url: str, prefix: str) -> None:
    agent = make_agent()
    with pytest.raises(AgentUnavailable):
        AgentClient("127.0.0.1:1", PeerAuth(), timeout_s=0.5).stats()
    client = AgentClient(agent.address, PeerAuth.for_store(redis_url, prefix))
    assert client.stats().capacity == agent.alloc.capacity
    client.close()
