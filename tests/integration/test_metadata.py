import msgpack
import redis

from kvstore.metadata import AgentInfo, ChunkLocation, MetadataStore, connect


def keys(n: int) -> list[bytes]:
    return [bytes([i + 1]) * 16 for i in range(n)]


def test_commit_lookup_prefix_and_events(redis_url: str, prefix: str) -> None:
    meta = MetadataStore(connect(redis_url), prefix)
    sub = redis.Redis.from_url(redis_url).pubsub()
    sub.subscribe(meta.events_channel)
    sub.get_message(timeout=1)
    locs = [ChunkLocation("n1", "seg", 64 * i, 10, i) for i in range(3)]
    ks = keys(4)
    meta.commit([(ks[0], locs[0]), (ks[1], locs[1]), (ks[3], locs[2])])
    assert meta.lookup(ks) == [locs[0], locs[1], None, locs[2]]
    assert meta.prefix_hits(ks) == locs[:2]  # stops at the first miss
    event = sub.get_message(timeout=2)
    assert event is not None
    kind, node, evkeys = msgpack.unpackb(event["data"])
    assert (kind, node, evkeys) == ("stored", "n1", [ks[0], ks[1], ks[3]])
    assert meta.stats()["saved"] == 3


def test_remove_is_compare_and_delete(redis_url: str, prefix: str) -> None:
    meta = MetadataStore(connect(redis_url), prefix)
    k = keys(1)[0]
    old, new = ChunkLocation("a", "s", 0, 1, 1), ChunkLocation("b", "s", 0, 1, 1)
    meta.commit([(k, old)])
    meta.commit([(k, new)])  # another agent stored the same content since
    assert meta.remove([(k, old)]) == 0
    assert meta.lookup([k]) == [new]
    assert meta.remove([(k, new)]) == 1
    assert meta.lookup([k]) == [None]


def test_agents_and_counters(redis_url: str, prefix: str) -> None:
    meta = MetadataStore(connect(redis_url), prefix)
    info = AgentInfo("node-1", "seg", 1024, "127.0.0.1:1")
    meta.register_agent(info)
    assert meta.agent("node-1") == info and meta.agents() == [info]
    meta.add_counters("decode-x", {"loaded_chunks": 3}, 0.0)
    meta.add_counters("decode-x", {"loaded_chunks": 2}, 1.0)
    assert meta.stats("decode-x")["loaded_chunks"] == 5 and meta.stats()["loaded_chunks"] == 5
    meta.unregister_agent("node-1")
    assert meta.agent("node-1") is None
