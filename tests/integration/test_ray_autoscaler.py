"""Ray's autoscaler with pdserve's node types: load on the prefill pool brings up a
prefill-heavy node, not a decode-heavy one.

The node types are those of the shipped ``deploy/ray/aws.yaml`` (what each offers:
``prefill_node`` or ``decode_node``; their min and max workers), on Ray's fake multinode
provider: ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` runs the real
autoscaler (monitor) and starts each node it launches as a local raylet (``ray up`` cannot
drive that provider in Ray 2.60: see ENVIRONMENT.md). One replica's worth of a type's
resource per node, so a second prefill replica needs a second prefill node. The pools are
deployed as ``pdserve up`` deploys them (``cluster.app.pool_deployment``) with fake engines
(the autoscaler is the subject): prefill autoscales on its queued prompt work
(``cluster.autoscaling``), decode is fixed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray import serve
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from cluster.app import pool_deployment
from cluster.config import ClusterConfig
from cluster.model import prepare_default_model
from cluster.runtime import free_port, stop_ray, wait_until
from router.app import Router, RouterSpec

from .fakes import MODEL, ZERO, FakeDecode, FakePrefill
from .test_autoscaling import APP, Load, running

SHIPPED = Path(__file__).resolve().parents[2] / "deploy/ray/aws.yaml"
RAY = str(Path(sys.executable).with_name("ray"))


def fake_cluster_config(gcs_port: int) -> dict[str, Any]:
    """The shipped cloud YAML's worker node types on the fake multinode provider."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    types: dict[str, Any] = {"ray.head.default": {"resources": {"CPU": 2}, "max_workers": 0, "node_config": {}}}
    for name, t in shipped["available_node_types"].items():
        if name == shipped["head_node_type"]:
            continue
        roles = {r: 1 for r in t["resources"]}  # one replica's worth a node (the YAML says 4 GPUs' worth)
        types[name] = {"resources": {"CPU": 1, **roles}, "min_workers": t["min_workers"],
                       "max_workers": min(t["max_workers"], 2), "node_config": {}}
    return {
        "cluster_name": "pdserve-fake", "max_workers": 4, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        # Fake nodes are known by node id, not IP (they all share this machine's): the head too.
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_launch_config_check": True, "disable_node_updaters": True},
        "auth": {"ssh_user": "ubuntu"}, "available_node_types": types, "head_node_type": "ray.head.default",
        # What `ray up` fills in from a provider's defaults (this provider ships none in 2.60).
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def nodes_offering(resource: str) -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource))


@pytest.fixture(scope="module")
def fake_cluster() -> Iterator[str]:
    temp_dir = tempfile.mkdtemp(prefix="pdfake-")  # every process of this cluster names it: stop_ray finds them
    port = free_port()
    cfg = Path(temp_dir) / "autoscaler.yaml"
    cfg.write_text(yaml.safe_dump(fake_cluster_config(port)))
    # Ray 2.60's `ray start --head` turns token auth on when ~/.ray/auth_token exists, while this
    # process's Ray read its auth mode at import: off for both, on a cluster that only listens
    # to this machine.
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
           "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
    try:
        # Output to a file: the daemons `ray start` leaves behind would hold a pipe open.
        with open(Path(temp_dir) / "ray-start.log", "wb") as log:
            subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp_dir}",
                            f"--autoscaling-config={cfg}", "--include-dashboard=false", "--disable-usage-stats"],
                           env=env, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=120)
        ray.init(address=f"127.0.0.1:{port}", namespace="pdserve-autoscaler-test", log_to_driver=False)
        # The min_workers of each type: one prefill-heavy and one decode-heavy node.
        wait_until(lambda: nodes_offering("prefill_node") == 1 and nodes_offering("decode_node") == 1, 120,
                   "the autoscaler's first worker nodes")
        yield temp_dir
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            stop_ray(temp_dir)


def test_prefill_load_brings_up_a_prefill_node_not_a_decode_node(fake_cluster: str) -> None:
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    scaling = ("{min_replicas: 1, max_replicas: 2, upscale_delay_s: 1, downscale_delay_s: 600, "
               "look_back_period_s: 2, target_queue_s: 0.5}")
    cfg = ClusterConfig.load(None, ["prefill.cpus_per_replica=0", "decode.cpus_per_replica=0",
                                    "prefill.resources={prefill_node: 1}", "decode.resources={decode_node: 1}",
                                    f"prefill.autoscaling={scaling}"])
    spec = RouterSpec(model_dir=str(prepare_default_model()), served_model_name=MODEL, max_model_len=1024,
                      default_max_tokens=2, max_body_bytes=64 * 1024,
                      namespace={"model": "m", "dtype": "float32", "layout": "cpu/bs32", "chunk_tokens": 32})
    router = serve.deployment(Router, name="router",
                              ray_actor_options={**ZERO, "resources": {"node:__internal_head__": 0.01}})
    serve.run(router.bind(spec.__dict__, pool_deployment(FakePrefill, "prefill", cfg.prefill, cfg).bind(0.002),
                          pool_deployment(FakeDecode, "decode", cfg.decode, cfg).bind()), name=APP)
    assert running("prefill") == 1 and running("decode") == 1

    load = Load(f"http://127.0.0.1:{http_port}", clients=8)
    try:
        # The second prefill replica fits on no node: Ray's autoscaler must add a prefill-heavy one.
        wait_until(lambda: running("prefill") == 2, 180, "a second prefill replica, on a new node")
    finally:
        statuses = load.stop()
    assert nodes_offering("prefill_node") == 2, ray.nodes()
    assert nodes_offering("decode_node") == 1, "decode-heavy nodes grew on prefill's load"
    assert running("decode") == 1
    assert set(statuses) == {200}, statuses
