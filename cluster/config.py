"""The one config tree: ``ClusterConfig``, loaded from YAML and overridable from the CLI.

Every field has one default, here. Cross-field rules (KV must be interchangeable between the
pools, chunks must be whole blocks) are validators, so a bad config fails at ``pdserve up``
with a message that says what to change, not later inside an engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Strict):
    dtype: str = Field("float32", description="Model dtype (float32 on CPUs without AVX-512/AMX).")
    block_size: int = Field(32, description="KV block size in tokens (a multiple of 32 on CPU).")
    max_model_len: int = Field(2048, ge=64, description="Context length (prompt + output).")
    enforce_eager: bool = Field(True, description="Skip torch.compile / CUDA graphs.")
    enable_prefix_caching: bool = Field(True, description="vLLM's own in-engine prefix cache.")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one engine batch.")
    max_num_batched_tokens: int = Field(2048, ge=64, description="Token budget of one step.")
    stream_interval: int = Field(
        1, ge=1, description="Output tokens per streamed message (vLLM's stream_interval; the first and last "
        "go out at once): every message is a chunk through the router replica and Serve's HTTP proxy (with "
        "router.decode_stream: serve, also an item of the decode replica's Serve call), so at high token rates a few "
        "tokens a message spend that path's CPU a few times less.",
    )
    kv_cache_gib: int = Field(1, ge=1, description="CPU KV cache pool per engine (whole GiB).")
    gpu_memory_utilization: float = Field(0.4, gt=0, le=1, description="GPU memory share.")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1 << 20, description="GPU KV cache size in bytes (vLLM's kv_cache_memory_bytes): skips vLLM's "
        "memory profiling, so engines starting together on one GPU each get this much; None = sized from "
        "gpu_memory_utilization.",
    )

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v <= 0 or v % 16:
            raise ValueError("block_size must be a positive multiple of 16 (32 on CPU)")
        return v


class ScalingConfig(_Strict):
    """Per-role autoscaling: each pool scales on the signal that limits its role, between its
    bounds, through Serve's autoscaler (``cluster.autoscaling``); a pool's ``replicas`` is
    then where it starts."""

    min_replicas: int = Field(1, ge=1, description="Fewest replicas (the router needs one per pool).")
    max_replicas: int = Field(4, ge=1, description="Most replicas; more nodes come from Ray's autoscaler.")
    target_queue_s: float = Field(
        4.0, gt=0, description="prefill: seconds of queued prompt work per replica (queued tokens / its "
        "measured rate) to hold; more scales up, less scales down.",
    )
    target_inflight: float = Field(16.0, gt=0, description="decode: sequences in flight per replica to hold.")
    target_kv_usage: float = Field(0.8, gt=0, le=1, description="decode: KV cache usage per replica to hold.")
    upscale_delay_s: float = Field(5.0, ge=0, description="A need to scale up must last this long.")
    downscale_delay_s: float = Field(60.0, ge=0, description="A surplus must last this long before a "
                                     "replica is drained and stopped.")
    look_back_period_s: float = Field(
        20.0, gt=0, description="Replica metrics are averaged over this window (replicas report every 10 s "
        "unless RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S says otherwise).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ScalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling.max_replicas ({self.max_replicas}) is below min_replicas "
                             f"({self.min_replicas})")
        return self


class PoolConfig(_Strict):
    replicas: int = Field(1, ge=1, description="Engine replicas in this pool.")
    cpus_per_replica: float = Field(1.0, ge=0, description="Ray CPUs reserved per replica.")
    gpus_per_replica: float = Field(
        0.0, ge=0, description="Ray GPUs per replica (0 = CPU); with tensor_parallel_size > 1, one per rank.",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks per replica; a replica's ranks are one placement group on one node.",
    )
    cpu_binding: list[str] = Field(
        default_factory=list,
        description="Cores per local replica rank, e.g. ['0'] or ['0-3', '4-7']; empty = vLLM's default.",
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Serve's per-replica request cap.")
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests a router replica queues for this pool when every replica is at "
        "max_ongoing_requests; past it, 429 with Retry-After (-1 = no limit).",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources per replica: pins the pool to nodes that offer them.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    autoscaling: ScalingConfig | None = Field(
        None, description="Scale this pool on its role's signal between bounds; None = fixed `replicas`.",
    )

    @model_validator(mode="after")
    def _gpus_per_rank(self) -> PoolConfig:
        tp, gpus = self.tensor_parallel_size, self.gpus_per_replica
        if tp > 1 and gpus and gpus != tp:
            raise ValueError(f"a replica with tensor_parallel_size {tp} takes one GPU per rank: set "
                             f"gpus_per_replica to {tp} (or 0 for CPU), not {gpus:g}")
        return self

    @model_validator(mode="after")
    def _start_within_bounds(self) -> PoolConfig:
        a = self.autoscaling
        if a is not None and not a.min_replicas <= self.replicas <= a.max_replicas:
            raise ValueError(f"replicas ({self.replicas}) is where an autoscaling pool starts: it must lie "
                             f"within autoscaling.min_replicas..max_replicas ({a.min_replicas}..{a.max_replicas})")
        return self


class StoreTlsConfig(_Strict):
    """PEM files at the same paths on every node; the certificate is issued for the name
    ``pdserve-store`` (kvstore.peer_auth.TLS_SERVER_NAME), so one serves every agent."""

    cert: str = Field(description="The agents' and engines' certificate (PEM), issued for 'pdserve-store'.")
    key: str = Field(description="Its private key (PEM).")
    ca: str = Field(description="The CA certificate both sides verify the other against (PEM).")

    @model_validator(mode="after")
    def _files_exist(self) -> StoreTlsConfig:
        missing = [p for p in (self.cert, self.key, self.ca) if not Path(p).is_file()]
        if missing:
            raise ValueError(f"kvstore.tls files not found: {missing}")
        return self


class KVStoreConfig(_Strict):
    redis_url: str | None = Field(None, description="Redis for metadata; None = start one.")
    capacity_mb: int = Field(1024, ge=1, description="Shared-memory segment per node (MiB).")
    chunk_tokens: int = Field(32, ge=16, description="Tokens per stored chunk (whole blocks).")
    prefix: str = Field("pdkv", min_length=1, description="Redis key prefix of this store.")
    transport: Literal["tcp", "grpc"] = Field("tcp", description="How chunks move between nodes.")
    ttl_s: float = Field(0.0, ge=0, description="Idle chunks expire after this long; 0 = never.")
    lease_s: float = Field(10.0, gt=0, description="A remote read's pin lapses after this (stuck transfer).")
    gpu_tier_mb: int = Field(
        0, ge=0, description="CUDA engines: GPU memory (MiB) per prefill engine process holding its most recently "
        "saved chunks, which the decode engines of its node pull through CUDA IPC (the device tier; the host "
        "segment still holds every chunk); taken on top of vLLM's own memory. 0 = off; ignored on CPU.",
    )
    replicate_after: int = Field(
        0, ge=0, description="Hot-chunk replication: a chunk that a node's engines have pulled from other nodes this "
        "many times gets a replica in that node's segment (pulled once more in the background, verified), which "
        "that node then reads first. 0 = off.",
    )
    tls: StoreTlsConfig | None = Field(
        None, description="Serve the agents' gRPC over mutual TLS only (needs transport grpc; the plaintext "
        "tcp slot server is then not started). Peers always prove the store token derived from Redis' password.",
    )

    @model_validator(mode="after")
    def _tls_needs_grpc(self) -> KVStoreConfig:
        if self.tls is not None and self.transport != "grpc":
            raise ValueError("kvstore.tls encrypts the grpc transport only: set kvstore.transport to grpc "
                             "(the tcp transport is plaintext and is not served under TLS)")
        return self

    def tls_files(self) -> dict[str, str] | None:
        return self.tls.model_dump() if self.tls is not None else None


class RouterConfig(_Strict):
    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(0, ge=0, le=65535, description="HTTP port; 0 = a free one.")
    policy: Literal["kv_aware", "prefix_tree_approx", "least_loaded", "round_robin"] = Field(
        "kv_aware", description="Routing policy: kv_aware (estimated time to first token, every cache "
        "counted), prefix_tree_approx (SGLang-style), least_loaded, round_robin.",
    )
    replicas: int = Field(
        1, ge=1, description="Router replicas; each keeps its own indexes from the same streams (no shared lock).",
    )
    prefill_prior_tps: float = Field(
        350.0, gt=0, description="Prefill tokens/s per replica assumed until its rate is measured.",
    )
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Larger bodies get 413.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when the body has none.")
    auth: Literal["auto", "required", "off"] = Field(
        "auto", description="API keys on /v1 and /debug: required, off, or auto (required unless `host` is "
        "loopback). Keys come from PDSERVE_API_KEYS (comma-separated) and `api_keys_file`.",
    )
    api_keys_file: str | None = Field(None, description="A file of API keys, one per line ('#' comments).")
    metrics_export_s: float = Field(
        5.0, ge=0, description="Seconds between exports of pdserve's metrics through Ray's metrics export "
        "(ray_pdserve_* on every node's metrics agent); 0 = only the router's /metrics.",
    )
    max_inflight_requests: int = Field(
        512, ge=1, description="Generate requests one router replica takes at once; past it, 429 with Retry-After.",
    )
    retry_after_s: float = Field(1.0, gt=0, description="The Retry-After a 429 carries.")
    request_timeout_s: float = Field(
        600.0, ge=0, description="A request not finished this long after it arrived is stopped (its engine "
        "calls cancelled) and answered 503; 0 = no limit.",
    )
    prefill_attempts: int = Field(
        3, ge=1, description="Tries of a request's prefill when replicas are lost under it (each elsewhere).",
    )
    decode_resumes: int = Field(
        3, ge=0, description="Times a decode stream whose replica is lost is resumed on another replica.",
    )
    decode_stream: Literal["channel", "serve"] = Field(
        "channel", description="How decoded tokens reach the router replica: channel (the decode replica sends "
        "each engine step's tokens of this router's requests as one ZMQ message to its token inbox; the router "
        "replica's node must be reachable on a random TCP port from the decode nodes) or serve (each token is an "
        "item of the Serve call's stream: a Ray object or gRPC message a token, ~2x the router's CPU a token).",
    )
    serve_transport: Literal["grpc", "ray"] = Field(
        "grpc", description="How Serve carries pdserve's calls, from the HTTP proxy to the router replicas and "
        "from those to the engine replicas: grpc (Serve's inter-deployment gRPC, which every replica runs; "
        "arguments by value, which suits these small ones: the KV goes through the store; about 0.7x the CPU "
        "per token of the router, the proxy and the decode replica on bench/stream) or ray (a Ray actor call "
        "each, arguments by reference).",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources per router replica: keeps the HTTP tier on nodes that offer them "
        "(e.g. the head, not the GPU nodes an engine fault or a scale-down takes away).",
    )
    proxy_location: Literal["HeadOnly", "EveryNode"] = Field(
        "HeadOnly", description="Where Serve runs HTTP proxies (EveryNode needs a port free on every node).",
    )


class ClusterConfig(_Strict):
    model: str = Field("default", description="Checkpoint directory, or 'default' (SmolLM2-135M).")
    served_model_name: str | None = Field(None, description="Name in the API; default: dir name.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Engine device.")
    ray_address: str | None = Field(None, description="Join this Ray cluster; None = start one.")
    app_name: str = Field("pdserve", description="Serve application name.")
    prefill: PoolConfig = Field(default_factory=lambda: PoolConfig(cpu_binding=["0"]))
    decode: PoolConfig = Field(default_factory=lambda: PoolConfig(cpu_binding=["1"]))
    kvstore: KVStoreConfig = Field(default_factory=KVStoreConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)

    @model_validator(mode="after")
    def _kv_interchangeable(self) -> ClusterConfig:
        p, d = self.prefill.engine, self.decode.engine
        if p.block_size != d.block_size or p.dtype != d.dtype:
            raise ValueError(
                "prefill and decode engines must share block_size and dtype, or decode cannot "
                f"use prefill's KV (prefill: {p.block_size}/{p.dtype}, decode: {d.block_size}/{d.dtype})"
            )
        if self.kvstore.chunk_tokens % p.block_size:
            raise ValueError(
                f"kvstore.chunk_tokens ({self.kvstore.chunk_tokens}) must be a multiple of "
                f"engine.block_size ({p.block_size})"
            )
        return self

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> ClusterConfig:
        data: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text())
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"{path}: the top level must be a mapping")
            data = loaded or {}
        for item in overrides or []:
            _apply_override(data, item)
        return cls.model_validate(data)


def _apply_override(data: dict[str, Any], item: str) -> None:
    """``a.b.c=value``; the value is parsed as YAML (numbers, bools, lists, null)."""
    path, sep, raw = item.partition("=")
    if not sep or not path.strip():
        raise ValueError(f"override {item!r} is not of the form key.path=value")
    keys = path.strip().split(".")
    node = data
    for key in keys[:-1]:
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"override {item!r}: {key} is not a section")
        node = nxt
    node[keys[-1]] = yaml.safe_load(raw)
