"""Store Agents follow the Ray nodes: one per node (also nodes that join later), chunks pulled
across nodes, and a node that leaves takes its chunks out of the metadata."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.runtime import wait_until
from cluster.store_nodes import AGENT_NAMESPACE, StoreNodesSpec, list_agents, start_store, stop_store
from kvstore.metadata import MetadataStore, connect


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1}})
    c.add_node(num_cpus=1, resources={"node_b": 1})
    ray.init(address=c.address, namespace="pdserve-test")
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@ray.remote(num_cpus=0)
def write_chunk(redis_url: str, prefix: str, key: bytes, data: bytes) -> str:
    from kvstore.client import ChunkToSave, StoreClient

    node = ray.get_runtime_context().get_node_id()
    c = StoreClient(redis_url, prefix, node)
    assert c.batch_put([ChunkToSave(key, len(data))], lambda i, view: view.__setitem__(slice(None), data)) == 1
    c.close()
    return node


@ray.remote(num_cpus=0)
def read_chunk(redis_url: str, prefix: str, key: bytes) -> tuple[str, bytes | None, dict[str, int]]:
    from kvstore.client import StoreClient

    node = ray.get_runtime_context().get_node_id()
    c = StoreClient(redis_url, prefix, node)
    got: list[bytes] = []
    locs = [loc for loc in c.lookup([key]) if loc]
    c.batch_get([key] * len(locs), locs, lambda i, p: got.append(bytes(p)))
    c.close()
    return node, (got[0] if got else None), c.drain_counters()


def test_agents_follow_the_nodes_and_chunks_cross_them(cluster: Cluster, redis_url: str, prefix: str) -> None:
    meta = MetadataStore(connect(redis_url), prefix)
    spec = StoreNodesSpec(redis_url, 4 << 20, prefix, {"alive_ttl_ms": 2000})
    names = start_store(spec)
    try:
        assert len(names) == 2 and len({a.node_id for a in meta.agents()}) == 2
        assert start_store(spec) == names  # idempotent
        data = bytes(range(256)) * 64
        w = ray.get(write_chunk.options(resources={"node_a": 0.01}).remote(redis_url, prefix, b"x" * 16, data))
        r, got, counters = ray.get(read_chunk.options(resources={"node_b": 0.01}).remote(redis_url, prefix, b"x" * 16))
        assert w != r and got == data and counters["loaded_remote_chunks"] == 1

        # A node that joins later gets its agent from the supervisor.
        late = cluster.add_node(num_cpus=1, resources={"node_c": 1})
        cluster.wait_for_nodes()
        wait_until(lambda: len(list_agents()) == 3 and len(meta.agents()) == 3, 60, "an agent on the new node")

        # A node that leaves: its chunks leave the metadata, readers elsewhere see a miss.
        c_node = ray.get(write_chunk.options(resources={"node_c": 0.01}).remote(redis_url, prefix, b"c" * 16, data))
        assert [k for k, _ in meta.node_chunks(c_node)] == [b"c" * 16]
        cluster.remove_node(late)
        wait_until(lambda: meta.lookup([b"c" * 16]) == [None], 30, "the departed node's chunks to be dropped")
        assert c_node not in {a.node_id for a in meta.agents()} and meta.node_chunks(c_node) == []
        _, got, _ = ray.get(read_chunk.options(resources={"node_b": 0.01}).remote(redis_url, prefix, b"c" * 16))
        assert got is None
        assert meta.lookup([b"x" * 16])[0] is not None  # the other nodes' chunks stay
    finally:
        stop_store()
    assert list_agents() == []
    with pytest.raises(ValueError):
        ray.get_actor(names[0], namespace=AGENT_NAMESPACE)
    assert meta.agents() == [] and meta.lookup([b"x" * 16]) == [None]  # a stopped agent drops its chunks
