"""The pull counts that decide which chunks a node replicates (``kvstore.replication``); the
replication itself is tested with real agents in tests/integration/test_store_replication.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kvstore.metadata import ChunkLocation
from kvstore.replication import PullCounts


def test_pull_counts_make_a_chunk_hot_once_per_threshold_and_forget_the_oldest() -> None:
    loc = ChunkLocation("node-A", "seg", 0, 10, 1)
    counts = PullCounts(after=3, track=2)
    a, b, c = (bytes([i]) * 16 for i in range(3))
    assert counts.hot([(a, loc), (b, loc)]) == []
    assert counts.hot([(a, loc)]) == []
    assert counts.hot([(a, loc), (b, loc)]) == [(a, loc)]  # a's third pull; b has two
    assert counts.hot([(a, loc)]) == []  # a starts over
    assert counts.hot([(c, loc)]) == []  # three chunks tracked in a table of two: b, the oldest, goes
    assert counts.hot([(b, loc)]) == []
    with pytest.raises(ValueError):
        PullCounts(after=0)


def test_replicate_after_reaches_the_connector_settings(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from cluster.app import engine_spec
    from cluster.config import ClusterConfig
    from kvstore.connector import ConnectorSettings

    cfg = ClusterConfig.load(None, ["kvstore.replicate_after=2"])
    for role in ("prefill", "decode"):
        assert engine_spec(cfg, getattr(cfg, role), role, tmp_path, "redis://127.0.0.1:1").store_replicate_after == 2
    assert ClusterConfig().kvstore.replicate_after == 0
    with pytest.raises(ValidationError):
        ClusterConfig.load(None, ["kvstore.replicate_after=-1"])
    vllm_config = SimpleNamespace(cache_config=SimpleNamespace(block_size=32),
                                  model_config=SimpleNamespace(model="m", dtype="float32"),
                                  device_config=SimpleNamespace(device_type="cpu"))
    extra = {"redis_url": "redis://x", "node_id": "node-A"}
    assert ConnectorSettings.parse({**extra, "replicate_after": 2}, vllm_config).replicate_after == 2  # type: ignore[arg-type]
    assert ConnectorSettings.parse(extra, vllm_config).replicate_after == 0  # type: ignore[arg-type]
