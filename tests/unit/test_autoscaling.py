"""The per-role autoscaling policies (``cluster.autoscaling``) on constructed contexts: each
role scales on its own signal, and the pool config turns into Serve's autoscaling options."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from cluster.autoscaling import DecodeScaling, PrefillScaling, deployment_options
from cluster.config import ClusterConfig, PoolConfig
from kvstore.messages import ReplicaLoad, scaling_stats


def ctx(metrics: dict[str, dict[str, float]], replicas: int = 2, target: int = 2) -> Any:
    names = [f"r{i}" for i in range(replicas)]
    return SimpleNamespace(aggregated_metrics=metrics, running_replicas=names, target_num_replicas=target)


def test_prefill_scales_with_queued_prompt_work_in_seconds() -> None:
    p = PrefillScaling(target_queue_s=2.0, prior_tps=100.0)
    busy = {"queued_tokens": {"r0": 800.0, "r1": 400.0}, "prefill_tps": {"r0": 100.0, "r1": 100.0}}
    desired, state = p(ctx(busy))
    assert desired == pytest.approx(2 * 6.0 / 2.0) and state["queue_s"] == 6.0  # 3x the work it should hold
    idle = {"queued_tokens": {"r0": 0.0, "r1": 0.0}, "prefill_tps": {"r0": 100.0, "r1": 100.0}}
    assert p(ctx(idle))[0] == 0.0  # Serve's bounds keep min_replicas
    # Not measured yet (rate 0): the prior rate stands in. Nothing reported: stay where it is.
    assert p(ctx({"queued_tokens": {"r0": 400.0}, "prefill_tps": {"r0": 0.0}}))[0] == pytest.approx(2 * 4.0 / 2.0)
    assert p(ctx({}, target=3))[0] == 3


def test_decode_scales_on_sequences_or_kv_whichever_binds() -> None:
    d = DecodeScaling(target_inflight=8.0, target_kv_usage=0.8)
    streams = {"inflight": {"r0": 16.0, "r1": 16.0}, "kv_usage": {"r0": 0.2, "r1": 0.2}}
    assert d(ctx(streams))[0] == pytest.approx(4.0)
    full_kv = {"inflight": {"r0": 2.0, "r1": 2.0}, "kv_usage": {"r0": 0.96, "r1": 0.96}}
    assert d(ctx(full_kv))[0] == pytest.approx(2 * 0.96 / 0.8)
    # Prefill's signal does not move decode.
    assert d(ctx({"inflight": {"r0": 0.0, "r1": 0.0}, "queued_tokens": {"r0": 1e6}}))[0] == 0.0


def test_replicas_report_what_the_policies_read() -> None:
    stats = scaling_stats(ReplicaLoad("p", "n", inflight=3, queued_tokens=900, computed_tokens=2000, busy_s=4.0,
                                      kv_usage=0.5))
    assert stats == {"queued_tokens": 900.0, "prefill_tps": 500.0, "inflight": 3.0, "kv_usage": 0.5}
    assert scaling_stats(ReplicaLoad("p", "n", computed_tokens=50, busy_s=0.1))["prefill_tps"] == 0.0  # too short


def test_pool_config_becomes_serve_options() -> None:
    cfg = ClusterConfig.load(None, ["prefill.replicas=2", "prefill.autoscaling.max_replicas=4",
                                    "prefill.autoscaling.target_queue_s=1.5"])
    opts = deployment_options("prefill", cfg.prefill, prior_tps=350.0)["autoscaling_config"]
    assert (opts["min_replicas"], opts["initial_replicas"], opts["max_replicas"]) == (1, 2, 4)
    assert opts["policy"] == {"policy_function": "cluster.autoscaling:PrefillScaling",
                              "policy_kwargs": {"target_queue_s": 1.5, "prior_tps": 350.0}}
    assert deployment_options("decode", cfg.decode, 350.0) == {"num_replicas": 1}  # fixed unless configured
    with pytest.raises(ValidationError, match="within autoscaling.min_replicas"):
        PoolConfig(replicas=5, autoscaling={"max_replicas": 3})
    with pytest.raises(ValidationError, match="below min_replicas"):
        PoolConfig(autoscaling={"min_replicas": 3, "max_replicas": 2})
