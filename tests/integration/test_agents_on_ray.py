"""One Store Agent per Ray node, and a chunk written on one node read on another."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.runtime import AGENT_NAMESPACE, start_agents, stop_agents
from kvstore.metadata import MetadataStore, connect


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
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

    def fill(i: int, view: memoryview) -> None:
        view[:] = data

    assert c.save([ChunkToSave(key, len(data))], fill) == 1
    c.close()
    return node


@ray.remote(num_cpus=0)
def read_chunk(redis_url: str, prefix: str, key: bytes) -> tuple[str, bytes]:
    from kvstore.client import StoreClient

    node = ray.get_runtime_context().get_node_id()
    c = StoreClient(redis_url, prefix, node)
    got: list[bytes] = []
    c.load(key, c.lookup_prefix([key])[0], lambda p: got.append(bytes(p)))
    c.close()
    return node, got[0]


def test_agent_per_node_and_cross_node_pull(two_nodes: Cluster, redis_url: str, prefix: str) -> None:
    names = start_agents(redis_url, capacity_mb=4, prefix=prefix)
    try:
        meta = MetadataStore(connect(redis_url), prefix)
        agents = meta.agents()
        assert len(names) == 2 and len({a.node_id for a in agents}) == 2
        data = bytes(range(256)) * 64
        w = ray.get(write_chunk.options(resources={"node_a": 0.01}).remote(redis_url, prefix, b"x" * 16, data))
        r, got = ray.get(read_chunk.options(resources={"node_b": 0.01}).remote(redis_url, prefix, b"x" * 16))
        assert w != r and got == data
        assert start_agents(redis_url, capacity_mb=4, prefix=prefix) == names  # idempotent
    finally:
        stop_agents(names)
    for name in names:
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace=AGENT_NAMESPACE)
    assert MetadataStore(connect(redis_url), prefix).agents() == []
