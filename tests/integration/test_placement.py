"""Placement on a multi-node Ray cluster (``ray.cluster_utils.Cluster``: three nodes on this
machine): pools pinned to node types by their ``resources``, as the control plane deploys
them (``cluster.app.pool_deployment``), land where configured, and the router sees each replica on
its node (``/dashboard/data``). Fake engines: placement is the subject, not the engine.
Store agents on every node, also one added later: ``test_agents_on_ray.py``."""

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
def three_nodes() -> Iterator[tuple[str, dict[str, str]]]:
    """A head for the router, a prefill-type node and a decode-type node (custom resources,
    as the ray up YAML's node types declare them); yields the HTTP base URL and node ids."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {"prefill": cluster.add_node(num_cpus=1, resources={"prefill_node": 4}),
             "decode": cluster.add_node(num_cpus=1, resources={"decode_node": 4})}
    ray.init(address=cluster.address, namespace="pdserve-placement-test", log_to_driver=False)
    cluster.wait_for_nodes()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ClusterConfig(prefill=PoolConfig(replicas=2, cpus_per_replica=0, resources={"prefill_node": 1}),
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
        yield f"http://127.0.0.1:{port}", {role: node.node_id for role, node in nodes.items()}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_pools_land_on_the_node_types_they_are_pinned_to(three_nodes: tuple[str, dict[str, str]]) -> None:
    url, node_of = three_nodes
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3}
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200

    def placed() -> dict[str, list[str]]:
        pools = httpx.get(url + "/dashboard/data", timeout=30).json()["pools"]
        return {role: [r["node"] for r in rows] for role, rows in pools.items()}

    wait_until(lambda: len(placed().get("prefill", [])) == 2 and len(placed().get("decode", [])) == 1, 60,
               "both pools in the router's view")
    seen = placed()
    assert seen["prefill"] == [node_of["prefill"]] * 2, seen
    assert seen["decode"] == [node_of["decode"]], seen
