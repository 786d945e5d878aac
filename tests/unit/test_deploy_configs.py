"""The ray up cluster YAMLs in deploy/ray/ pass Ray's own cluster-config schema (the check
`ray up` runs first), and each one installs pdserve on every node and starts it on the head
with a pdserve config that loads. `ray up` of local.yaml for real, against an sshd on
loopback: tests/e2e/test_ray_up.py."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.config import ClusterConfig

RAY_DIR = Path(__file__).resolve().parents[2] / "deploy/ray"


@pytest.mark.parametrize("name", ["local", "aws", "gcp"])
def test_cluster_yaml_is_valid_and_runs_pdserve(name: str) -> None:
    cfg = yaml.safe_load((RAY_DIR / f"{name}.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # raises on anything ray up would refuse
    assert any("deploy/ensure.sh" in c for c in cfg["setup_commands"])  # every node: install what is missing
    up = [c for c in cfg["head_start_ray_commands"] if "pdserve up" in c]
    assert len(up) == 1, cfg["head_start_ray_commands"]
    config = re.search(r"--config (\S+)", up[0])
    assert config, up[0]
    pdserve = ClusterConfig.load(RAY_DIR.parents[1] / config.group(1))
    assert pdserve.ray_address == "127.0.0.1:6379"  # joins the Ray head that ray up started
    assert pdserve.prefill.resources == {"prefill_node": 1} and pdserve.decode.resources == {"decode_node": 1}
    if name == "local":
        return
    # Cloud: prefill-heavy and decode-heavy worker types that offer what the pools are pinned to.
    types = cfg["available_node_types"]
    assert types["prefill_gpu"]["resources"]["prefill_node"] >= 1
    assert types["decode_gpu"]["resources"]["decode_node"] >= 1
    assert pdserve.device == "cuda" and pdserve.prefill.gpus_per_replica == 1
