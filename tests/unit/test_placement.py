"""A pool's config -> where each replica runs (``cluster.placement``): one placement group
per replica, packed on one node, with bundles shaped for whoever takes the resources."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.config import PoolConfig
from cluster.placement import replica_placement
from kvstore.messages import EngineSpec


def test_one_rank_is_one_bundle_the_replica_takes_whole() -> None:
    got = replica_placement(PoolConfig(cpus_per_replica=2, gpus_per_replica=0.5, resources={"prefill_node": 1}))
    assert got["placement_group_bundles"] == [{"CPU": 2, "prefill_node": 1, "GPU": 0.5}]
    assert got["placement_group_strategy"] == "STRICT_PACK"
    assert got["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5, "resources": {"prefill_node": 1}}


def test_tensor_parallel_on_gpus_is_a_gpu_bundle_per_rank_on_one_node() -> None:
    got = replica_placement(PoolConfig(cpus_per_replica=1, gpus_per_replica=4, tensor_parallel_size=4,
                                       resources={"decode_node": 1}))
    assert got["placement_group_bundles"] == [{"CPU": 1, "decode_node": 1, "GPU": 1.0}] + [{"GPU": 1.0}] * 3
    assert got["placement_group_strategy"] == "STRICT_PACK"
    # vLLM's Ray executor puts rank 0 on bundle 0's GPU: the replica actor must leave it free.
    assert got["ray_actor_options"]["num_gpus"] == 0
    assert _spec("cuda", 4).executor_backend == "ray"


def test_tensor_parallel_on_cpus_is_one_bundle_of_all_its_cores() -> None:
    got = replica_placement(PoolConfig(cpus_per_replica=8, tensor_parallel_size=2))
    assert got["placement_group_bundles"] == [{"CPU": 8}]  # ranks are the engine's child processes
    assert _spec("cpu", 2).executor_backend == "mp" and _spec("cpu", 1).executor_backend is None


def test_a_replica_that_asks_for_nothing_still_gets_a_valid_bundle() -> None:
    got = replica_placement(PoolConfig(cpus_per_replica=0))
    assert got["placement_group_bundles"] == [{"CPU": 0.01}]
    assert got["ray_actor_options"]["num_cpus"] == 0


def test_tensor_parallel_gpus_must_be_one_per_rank() -> None:
    with pytest.raises(ValidationError, match="one GPU per rank"):
        PoolConfig(gpus_per_replica=1, tensor_parallel_size=2)


def _spec(device: str, tp: int) -> EngineSpec:
    return EngineSpec(model="m", served_model_name="m", role="prefill", kv_role="kv_both", device=device,
                      dtype="float32", block_size=32, max_model_len=256, enforce_eager=True,
                      enable_prefix_caching=True, max_num_seqs=4, max_num_batched_tokens=256, kv_cache_gib=1,
                      gpu_memory_utilization=0.4, cpu_binding=(), redis_url="redis://x", store_prefix="p",
                      store_transport="tcp", namespace={}, tensor_parallel_size=tp)
