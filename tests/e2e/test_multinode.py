"""Three Ray nodes (ray.cluster_utils, custom resources): prefill on node P, two decode
replicas on nodes D1 and D2. Every decode replica pulls the prompt's KV from P's store agent
over the tcp transport; the output is token-for-token the monolithic engine's, and the store
reports where every loaded chunk came from. One prompt sent again and again gets replicas of
its chunks on a decode node, which then decodes it from them. Then a decode node is dropped from the cluster
mid-stream: the stream goes on from the other node with no token lost or repeated, the
departed node's agent leaves the metadata, and the cluster keeps serving equal outputs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from ray.cluster_utils import Cluster as RayCluster

from cluster.runtime import wait_until
from kvstore import janitor
from kvstore.metadata import MetadataStore
from router.tokenizer import PromptTokenizer
from tests.e2e.conftest import HERE, Cluster, running_pdserve
from tests.e2e.helpers import (
    CHUNK,
    assert_matches_reference,
    complete_all,
    n_tokens,
    store,
    stream_through_a_fault,
)
from tests.e2e.prompts import EQUIVALENCE

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[RayCluster]:
    # The nodes' processes inherit this one's environment: not the session's socket dir
    # (tests/conftest.py), so their engines choose their own, as on a node of their own.
    saved = os.environ.pop(janitor.RPC_ENV, None)
    try:
        c = RayCluster(initialize_head=True,
                       head_node_args={"num_cpus": 1, "resources": {"pd_prefill": 1, "pd_router": 1}})
        for _ in range(2):
            c.add_node(num_cpus=1, resources={"pd_decode": 1})
    finally:
        if saved is not None:
            os.environ[janitor.RPC_ENV] = saved
    ray.init(address=c.address)
    c.wait_for_nodes()
    ray.shutdown()
    yield c
    c.shutdown()


def test_three_nodes_decode_pulls_the_kv_across_nodes_and_matches_monolithic(
    three_nodes: RayCluster, reference: dict, tokenizer: PromptTokenizer, model_dir: Path, tmp_path: Path,
) -> None:
    sets = [f"model={model_dir}", f"ray_address={three_nodes.address}"]
    with running_pdserve(tmp_path / "home", HERE / "multinode.yaml", sets) as cluster:
        meta = store(cluster)
        assert len({a.node_id for a in meta.agents()}) == 3  # one store agent per node
        prompts = [p for p in EQUIVALENCE if n_tokens(tokenizer, p) > CHUNK and len(reference[p]["token_ids"]) > 1]
        results = complete_all(cluster, prompts, concurrency=4)
        for prompt, res in zip(prompts, results, strict=True):
            assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])

        # Where every chunk a decode replica loaded came from, per replica.
        report = {}
        for name in meta.client.scan_iter("pdkv:stats:decode-*"):
            fields = {k.decode(): int(v) for k, v in meta.client.hgetall(name).items()}
            report[name.decode().removeprefix("pdkv:stats:")] = {
                "same_node": fields.get("loaded_local_chunks", 0), "remote": fields.get("loaded_remote_chunks", 0),
                "failed": fields.get("load_failures", 0), "bytes_in_tcp": fields.get("bytes_in_tcp", 0),
            }
        print("decode chunk sources:", report)
        used = {res["pdserve"]["decode_replica"] for res in results}
        assert len(used) == 2, f"both decode nodes should have served: {used}"
        loaded = sum(res["pdserve"]["decode_cached_tokens"] for res in results) // CHUNK
        assert loaded > 0
        # Every loaded chunk crossed nodes, except chunks two prompts share that a decode
        # node had pulled twice already (their replicas there, kvstore.replicate_after: 2).
        assert sum(r["remote"] + r["same_node"] for r in report.values()) == loaded
        assert sum(r["remote"] for r in report.values()) > 0 and sum(r["failed"] for r in report.values()) == 0
        assert all(r["bytes_in_tcp"] > 0 for r in report.values() if r["remote"])

        _hot_prompt_gets_replicas_and_is_decoded_from_them(cluster, prompts[0], reference)
        _drop_a_decode_node_mid_stream(cluster, three_nodes, prompts[0])
        # Healthy afterwards: the surviving nodes serve every prompt, still equal to monolithic.
        for prompt, res in zip(prompts[:4], complete_all(cluster, prompts[:4], concurrency=2), strict=True):
            assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])
            assert res["pdserve"]["decode_resumes"] == 0


def _loaded(meta: MetadataStore, replica: str, source: str) -> int:
    return int(meta.client.hget(f"pdkv:stats:{replica}", f"loaded_{source}_chunks") or 0)


def _hot_prompt_gets_replicas_and_is_decoded_from_them(cluster: Cluster, prompt: str, reference: dict) -> None:
    """One prompt, again and again: a decode node that has pulled its chunks twice keeps
    replicas of them; the router then sends the prompt's decode there, and those loads come
    from that node's own segment, still token for token the monolithic output."""
    meta = store(cluster)
    for res in complete_all(cluster, [prompt] * 4, concurrency=1):  # one node pulls it twice at least
        assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])
    names = wait_until(lambda: [n.decode() for n in meta.client.scan_iter("pdkv:r:*")], 60,
                       "replicas of the hot prompt's chunks")
    holders = {name.split(":")[2] for name in names}

    def both() -> dict[str, str] | None:
        # By engine instance (the name its store counters and responses carry); the dashboard
        # lists Serve's replica tags.
        rows = {"decode-" + str(row["replica"]).removeprefix("decode-"): row["node"] for row in _decode_rows(cluster)}
        return rows if len(rows) == 2 else None

    node_of = wait_until(both, 30, "both decode replicas on the dashboard")
    assert holders <= set(node_of.values()), f"replicas on a node without a decode replica: {holders} {node_of}"
    time.sleep(2)  # the router's store index hears of them from the change stream
    before = {r: _loaded(meta, r, "local") for r in node_of}
    results = complete_all(cluster, [prompt] * 2, concurrency=1)
    served = [res["pdserve"]["decode_replica"] for res in results]
    assert set(served) <= set(node_of), f"served by {served}, the dashboard lists {node_of}"
    for res in results:
        assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])
    assert all(node_of[r] in holders for r in served), f"decode went past the replicas: {served} {holders}"
    chunks = sum(res["pdserve"]["decode_cached_tokens"] for res in results) // CHUNK
    wait_until(lambda: sum(_loaded(meta, r, "local") - before[r] for r in node_of) >= chunks, 30,
               "the decode replicas to report loads from their own node")
    # Counters reach Redis with a worker's next loads: these two requests carried them.
    made = sum(int(meta.client.hget(f"pdkv:stats:{r}", "replicated_chunks") or 0) for r in node_of)
    assert made > 0 and not any(meta.client.hget(f"pdkv:stats:{r}", "replication_failures") for r in node_of)
    print("hot prompt: replicas on", holders, "served by", served, "local chunks", chunks)


def _decode_rows(cluster: Cluster) -> list[dict]:
    base = cluster.base_url.removesuffix("/v1")
    return list(httpx.get(f"{base}/dashboard/data", timeout=30).json()["pools"].get("decode", []))


def _busy_decode_node(cluster: Cluster) -> str:
    """The node of the one decode replica running a sequence (routing stats lag ~0.5 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        busy = [row["node"] for row in _decode_rows(cluster) if row["running"]]
        if len(busy) == 1:
            return str(busy[0])
        time.sleep(0.1)
    raise AssertionError(f"no single busy decode replica: {_decode_rows(cluster)}")


def _drop_a_decode_node_mid_stream(cluster: Cluster, nodes: RayCluster, prompt: str) -> None:
    """A long greedy stream; after 16 tokens the node its decode replica runs on leaves the
    Ray cluster (raylet, replica, engine and store agent gone at once). The client's stream
    is the uninterrupted one's, token for token (resumed on the other decode node, which
    loads the prompt's KV from the prefill node's agent)."""
    meta = store(cluster)

    def drop() -> str:
        busy = _busy_decode_node(cluster)
        (node,) = [n for n in nodes.worker_nodes if n.node_id == busy]
        nodes.remove_node(node, allow_graceful=False)
        return busy

    dropped = stream_through_a_fault(cluster, prompt, drop)
    # The departed node's agent and chunks leave the metadata (reaped by the surviving agents).
    wait_until(lambda: dropped not in {a.node_id for a in meta.agents()} and not meta.node_chunks(dropped),
               60, "the dropped node's agent to leave the store's metadata")
    wait_until(lambda: [row["node"] for row in _decode_rows(cluster)] != [] and
               dropped not in {row["node"] for row in _decode_rows(cluster)}, 60,
               "the router to stop listing the dropped node's replica")
