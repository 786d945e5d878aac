from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.config import ClusterConfig


def test_defaults_pin_prefill_and_decode_to_their_own_core() -> None:
    cfg = ClusterConfig()
    assert cfg.prefill.cpu_binding == ["0"] and cfg.decode.cpu_binding == ["1"]
    assert cfg.kvstore.redis_url is None


def test_yaml_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("prefill:\n  replicas: 2\nkvstore:\n  capacity_mb: 64\n")
    cfg = ClusterConfig.load(f, ["decode.engine.max_model_len=1024", "router.port=8123",
                                 "prefill.cpu_binding=['0', '1']"])
    assert cfg.prefill.replicas == 2 and cfg.kvstore.capacity_mb == 64
    assert cfg.decode.engine.max_model_len == 1024 and cfg.router.port == 8123
    assert cfg.prefill.cpu_binding == ["0", "1"]


@pytest.mark.parametrize("override", [
    "prefill.replicas=0",
    "prefill.engine.block_size=20",
    "kvstore.chunk_tokens=48",  # not whole blocks of 32
    "decode.engine.block_size=64",  # KV not interchangeable with prefill's
    "decode.engine.dtype=bfloat16",
    "router.policy=random",  # not a policy
    "prefill.bogus=1",  # typos are errors, not silently ignored
    "decode.engine.kv_cache_memory_bytes=4096",  # a GPU KV cache below 1 MiB is a typo
])
def test_bad_values_are_rejected(override: str) -> None:
    with pytest.raises((ValidationError, ValueError)):
        ClusterConfig.load(None, [override])


def test_a_pinned_gpu_kv_cache_reaches_the_engine_spec_only_when_set(tmp_path: Path) -> None:
    from cluster.app import engine_spec

    cfg = ClusterConfig.load(None, ["prefill.engine.kv_cache_memory_bytes=8589934592"])
    specs = {role: engine_spec(cfg, getattr(cfg, role), role, tmp_path, "redis://127.0.0.1:1")
             for role in ("prefill", "decode")}
    assert specs["prefill"].kv_cache_memory_bytes == 8 << 30  # engines sharing a GPU: no profiling race
    assert specs["decode"].kv_cache_memory_bytes is None  # unset: vLLM sizes it from gpu_memory_utilization


def test_stream_interval_reaches_the_engine_spec_and_must_be_positive(tmp_path: Path) -> None:
    from cluster.app import engine_spec

    cfg = ClusterConfig.load(None, ["decode.engine.stream_interval=4"])
    assert engine_spec(cfg, cfg.decode, "decode", tmp_path, "redis://127.0.0.1:1").stream_interval == 4
    assert engine_spec(cfg, cfg.prefill, "prefill", tmp_path, "redis://127.0.0.1:1").stream_interval == 1
    with pytest.raises((ValidationError, ValueError)):
        ClusterConfig.load(None, ["decode.engine.stream_interval=0"])


def test_malformed_override_and_non_mapping_yaml(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ClusterConfig.load(None, ["no-equals-sign"])
    f = tmp_path / "bad.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ValueError):
        ClusterConfig.load(f)


def test_redis_urls_are_redacted_for_print_and_their_password_recovered() -> None:
    from cluster.runtime import redacted, url_password

    url = "redis://:s3cr%2Ft@10.0.0.5:6379/0"
    assert redacted(url) == "redis://:***@10.0.0.5:6379/0" and "s3cr" not in redacted(url)
    assert url_password(url) == "s3cr/t"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0" and url_password("redis://h:1/0") is None


def test_store_tls_needs_the_grpc_transport_and_its_files(tmp_path: Path) -> None:
    for name in ("store.pem", "store.key", "ca.pem"):
        (tmp_path / name).write_text("PEM")
    tls = [f"kvstore.tls={{'cert': '{tmp_path}/store.pem', 'key': '{tmp_path}/store.key', 'ca': '{tmp_path}/ca.pem'}}"]
    with pytest.raises(ValidationError, match="transport to grpc"):
        ClusterConfig.load(None, tls)  # tcp, the default, is plaintext
    cfg = ClusterConfig.load(None, [*tls, "kvstore.transport=grpc"])
    assert cfg.kvstore.tls_files() == {"cert": f"{tmp_path}/store.pem", "key": f"{tmp_path}/store.key",
                                       "ca": f"{tmp_path}/ca.pem"}
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(ValidationError, match="not found"):
        ClusterConfig.load(None, [*tls, "kvstore.transport=grpc"])
    assert ClusterConfig().kvstore.tls_files() is None
