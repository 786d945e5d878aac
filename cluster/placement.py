"""Where a pool's replicas run: each replica's resources are one placement group, packed on
one node (``STRICT_PACK``), so a tensor-parallel replica's ranks never straddle nodes and the
replica reads the store segment of the node it is on.

The bundles follow who takes the resources:

- one rank (``tensor_parallel_size`` 1): one bundle, and the replica actor takes all of it
  (its CPUs and its GPU, or GPU fraction, and the pool's custom resources);
- several ranks on GPUs: vLLM's Ray executor starts one worker per GPU bundle of the
  replica's placement group, so bundle 0 carries the replica's CPUs, custom resources and
  rank 0's GPU, and bundles 1.. one GPU each; the replica actor itself takes no GPU;
- several ranks on CPUs: vLLM's CPU backend runs its ranks as child processes of the engine
  (the ``mp`` executor), which Ray does not schedule: one bundle with all the replica's CPUs.
"""

from __future__ import annotations

from typing import Any

from cluster.config import PoolConfig

STRATEGY = "STRICT_PACK"


def replica_placement(pool: PoolConfig) -> dict[str, Any]:
    """``serve.deployment`` keyword arguments for where one replica of ``pool`` runs:
    ``ray_actor_options``, ``placement_group_bundles`` and ``placement_group_strategy``."""
    tp, gpus = pool.tensor_parallel_size, pool.gpus_per_replica
    resources = dict(pool.resources)
    first: dict[str, float] = {"CPU": pool.cpus_per_replica, **resources}
    if tp > 1 and gpus:
        actor_gpus = 0.0
        bundles = [{**first, "GPU": 1.0}] + [{"GPU": 1.0} for _ in range(tp - 1)]
    else:
        actor_gpus = gpus
        bundles = [{**first, "GPU": gpus}] if gpus else [first]
    # Ray refuses a bundle with no resource at all; a replica that asks for none (tests with
    # fake engines) still gets a bundle, of a token CPU share.
    bundles = [{k: v for k, v in b.items() if v} or {"CPU": 0.01} for b in bundles]
    return {
        "ray_actor_options": {"num_cpus": pool.cpus_per_replica, "num_gpus": actor_gpus, "resources": resources},
        "placement_group_bundles": bundles,
        "placement_group_strategy": STRATEGY,
    }

