"""Placement on a multi-node Ray cluster (``ray.cluster_utils.Cluster``: four nodes on this
machine): pools pinned to node types by their ``resources``, as the control plane deploys
them (``cluster.app.pool_deployment``), land where configured; each replica is one placement
group packed on one node, a tensor-parallel replica's ranks included; and the router sees
each replica on its node (``/dashboard/data``). Fake engines: placement is the subject, not
the engine. Store agents on every node, also one added later: ``test_agents_on_ray.py``."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster.app import pool_deployment  # the control plane's deployment builder
from cluster.config import ClusterConfig, PoolConfig
from cluster.model import prepare_default_model
from cluster.runtime import free_port, wait_until
from router.app import Router, RouterSpec

from .fakes import MODEL, ZERO, FakeDecode, FakePrefill


@pytest.fixture(scope="module")
def four_nodes() -> Iterator[tuple[str, dict[str, list[str]]]]:
    """A head for the router, two prefill-type nodes of three GPUs each (Ray's GPU resource:
    no device is touched) and a decode-type node (custom resources, as the ray up YAML's
    node types declare them); yields the HTTP base URL and the node ids per role."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    prefill_nodes = [cluster.add_node(num_cpus=1, num_gpus=3, resources={"prefill_node": 4}) for _ in range(2)]
    decode_node = cluster.add_node(num_cpus=1, resources={"decode_node": 4})
    ray.init(address=cluster.address, namespace="pdserve-placement-test", log_to_driver=False)
    cluster.wait_for_nodes()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Two TP=2 prefill replicas of a GPU each per rank: the first packs onto one prefill node,
    # and the second, finding one GPU left there, must take the other node whole (STRICT_PACK
    # never splits a replica's ranks across nodes).
    cfg = ClusterConfig(prefill=PoolConfig(replicas=2, cpus_per_replica=0, tensor_parallel_size=2,
                                           gpus_per_replica=2, resources={"prefill_node": 1}),
                        decode=PoolConfig(replicas=1, cpus_per_replica=0, resources={"decode_node": 1}))
    spec = RouterSpec(model_dir=str(prepare_default_model()), served_model_name=MODEL, max_model_len=128,
                      default_max_tokens=4, max_body_bytes=64 * 1024,
                      namespace={"model": "m", "dtype": "float32", "layout": "cpu/bs32", "chunk_tokens": 32})
    prefill = pool_deployment(FakePrefill, "prefill", cfg.prefill, cfg).bind()
    decode = pool_deployment(FakeDecode, "decode", cfg.decode, cfg).bind()
    head = {"node:__internal_head__": 0.01}
    router = serve.deployment(Router, name="router", ray_actor_options={**ZERO, "resources": head})
    serve.run(router.bind(spec.__dict__, prefill, decode), name="placement")
    try:
        yield f"http://127.0.0.1:{port}", {"prefill": [n.node_id for n in prefill_nodes],
                                           "decode": [decode_node.node_id]}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_pools_land_on_the_node_types_they_are_pinned_to(four_nodes: tuple[str, dict[str, list[str]]]) -> None:
    url, node_of = four_nodes
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3}
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200

    def placed() -> dict[str, list[str]]:
        pools = httpx.get(url + "/dashboard/data", timeout=30).json()["pools"]
        return {role: [r["node"] for r in rows] for role, rows in pools.items()}

    wait_until(lambda: len(placed().get("prefill", [])) == 2 and len(placed().get("decode", [])) == 1, 60,
               "both pools in the router's view")
    seen = placed()
    assert sorted(seen["prefill"]) == sorted(node_of["prefill"]), seen  # one TP replica per prefill node
    assert seen["decode"] == node_of["decode"], seen


def test_each_replica_is_one_placement_group_packed_on_its_node(
    four_nodes: tuple[str, dict[str, list[str]]]
) -> None:
    url, node_of = four_nodes
    pools = httpx.get(url + "/dashboard/data", timeout=30).json()["pools"]
    groups = {pg["name"].rsplit("#", 1)[-1]: pg for pg in ray.util.placement_group_table().values()
              if pg["name"].startswith("SERVE_REPLICA::") and pg["state"] == "CREATED"}
    for role, ranks in (("prefill", 2), ("decode", 1)):
        for row in pools[role]:
            pg = groups[row["replica"]]  # Serve names a replica's group after the replica
            assert pg["strategy"] == "STRICT_PACK" and len(pg["bundles"]) == ranks, pg
            assert set(pg["bundles_to_node_id"].values()) == {row["node"]}, pg  # every rank on the replica's node
            if role == "prefill":
                assert [b.get("GPU") for b in pg["bundles"].values()] == [1.0, 1.0], pg  # a GPU per rank
