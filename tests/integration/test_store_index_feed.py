"""The router's store index kept current from the real change stream: resync at start,
events after it, a resync after missed (trimmed) events, and Redis going away and back."""

from __future__ import annotations

from pathlib import Path

from cluster.runtime import start_redis, stop_pid, url_password, wait_until
from kvstore.metadata import AgentInfo, ChunkLocation, MetadataStore, connect
from router.index import StoreIndex, StoreIndexFeed


def k(i: int) -> bytes:
    return bytes([i]) * 16


def loc(node: str, i: int) -> ChunkLocation:
    return ChunkLocation(node, "seg", 64 * i, 1, 1)


def test_feed_resyncs_follows_and_recovers(prefix: str, tmp_path: Path) -> None:
    url, port, pid = start_redis(tmp_path)
    try:
        meta = MetadataStore(connect(url), prefix)
        meta.heartbeat(AgentInfo("A", "seg", 1, "a:1"), ttl_ms=60_000)
        meta.commit([(k(1), loc("A", 1)), (k(2), loc("A", 2))])  # before the feed starts
        idx = StoreIndex()
        feed = StoreIndexFeed(idx, lambda: MetadataStore(connect(url), prefix), block_ms=100, retry_s=0.1)
        feed.start()
        wait_until(lambda: idx.stored_prefix([k(1), k(2)]) == 2, 10, "the resync")
        meta.commit([(k(3), loc("A", 3))])
        meta.remove([(k(1), loc("A", 1))])
        wait_until(lambda: idx.holders(k(3)) == ["A"] and idx.holders(k(1)) == [], 10, "the stream")

        # Missed events: the stream is trimmed past what the feed has seen -> resync.
        feed.stop()
        meta.commit([(k(4), loc("A", 4))])
        meta.commit([(k(5), loc("A", 5))])
        meta.client.xtrim(meta.events_stream, maxlen=1)  # k(4)'s event is gone
        resyncs = idx.stats().resyncs
        feed = StoreIndexFeed(idx, lambda: MetadataStore(connect(url), prefix), block_ms=100, retry_s=0.1)
        feed.start()
        wait_until(lambda: idx.holders(k(4)) == ["A"] and idx.holders(k(5)) == ["A"], 10, "a resync")
        assert idx.stats().resyncs > resyncs

        # Redis away: the index keeps its state; back (empty, then re-filled): resync.
        stop_pid(pid)
        wait_until(lambda: not feed.healthy, 10, "the feed to notice")
        assert idx.holders(k(5)) == ["A"]
        url, port, pid = start_redis(tmp_path, port=port, password=url_password(url))
        meta = MetadataStore(connect(url), prefix)
        meta.heartbeat(AgentInfo("A", "seg", 1, "a:1"), ttl_ms=60_000)
        meta.commit([(k(7), loc("A", 7))])  # what the agent re-publishes
        wait_until(lambda: feed.healthy and idx.holders(k(7)) == ["A"], 15, "the feed to resync")
        assert idx.holders(k(5)) == []  # gone from the new Redis, gone from the index
        feed.stop()
    finally:
        stop_pid(pid)
