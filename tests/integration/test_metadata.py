import time

from kvstore.metadata import AgentInfo, ChunkLocation, MetadataStore, connect


def keys(n: int) -> list[bytes]:
    return [bytes([i + 1]) * 16 for i in range(n)]


def test_commit_lookup_prefix_and_events(redis_url: str, prefix: str) -> None:
    meta = MetadataStore(connect(redis_url), prefix)
    locs = [ChunkLocation("n1", "seg", 64 * i, 10, i) for i in range(3)]
    ks = keys(4)
    meta.commit([(ks[0], locs[0]), (ks[1], locs[1]), (ks[3], locs[2])])
    assert meta.lookup(ks) == [locs[0], locs[1], None, locs[2]]
    assert meta.prefix_hits(ks) == locs[:2]  # stops at the first miss
    (event,) = meta.read_events()
    assert (event.op, event.node_id, event.keys) == ("stored", "n1", [ks[0], ks[1], ks[3]])
    assert meta.stats()["saved"] == 3
    meta.remove([(ks[0], locs[0])])
    (removed,) = meta.read_events(after=event.id)  # a consumer resumes where it left off
    assert (removed.op, removed.keys) == ("removed", [ks[0]])


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
    meta.heartbeat(info, ttl_ms=60_000)
    assert meta.agent("node-1") == info and meta.agents() == [info]
    meta.add_counters("decode-x", {"loaded_chunks": 3}, 0.0)
    meta.add_counters("decode-x", {"loaded_chunks": 2}, 1.0)
    assert meta.stats("decode-x")["loaded_chunks"] == 5 and meta.stats()["loaded_chunks"] == 5
    meta.unregister_agent("node-1")
    assert meta.agent("node-1") is None


def test_dead_nodes_are_reaped_with_their_chunks(redis_url: str, prefix: str) -> None:
    meta = MetadataStore(connect(redis_url), prefix)
    live, dead = AgentInfo("live", "s1", 1, "a:1"), AgentInfo("dead", "s2", 1, "a:2")
    assert meta.heartbeat(live, ttl_ms=60_000) is False  # first beat: nothing to re-publish yet
    assert meta.heartbeat(live, ttl_ms=60_000) is True
    meta.heartbeat(dead, ttl_ms=100)
    ks = keys(3)
    meta.commit([(ks[0], ChunkLocation("live", "s1", 0, 1, 1))])
    meta.commit([(ks[1], ChunkLocation("dead", "s2", 0, 1, 1)), (ks[2], ChunkLocation("dead", "s2", 64, 1, 1))])
    assert len(meta.node_chunks("dead")) == 2
    time.sleep(0.2)  # the dead agent stops beating; its liveness key expires
    assert meta.reap_dead_nodes() == {"dead": 2}
    assert meta.lookup(ks)[1:] == [None, None] and meta.lookup(ks)[0] is not None
    assert [a.node_id for a in meta.agents()] == ["live"] and meta.node_chunks("dead") == []
    assert meta.reap_dead_nodes() == {}  # idempotent


def test_restarted_agent_drops_its_previous_segment_only(redis_url: str, prefix: str) -> None:
    meta = MetadataStore(connect(redis_url), prefix)
    ks = keys(2)
    meta.commit([(ks[0], ChunkLocation("n", "old-seg", 0, 1, 1)), (ks[1], ChunkLocation("n", "new-seg", 0, 1, 1))])
    assert meta.drop_node("n", keep_segment="new-seg") == 1
    assert meta.lookup(ks)[0] is None and meta.lookup(ks)[1] is not None
