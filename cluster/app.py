"""The one builder: a validated ClusterConfig -> the Serve application graph.

    Router (ingress, HTTP) --handle--> prefill pool  (PrefillWorker x replicas)
                           --handle--> decode pool   (DecodeWorker  x replicas)

Both pools route through ``router.replica_router:PDRequestRouter``, so the routing policy
sees each request's chunk keys and each replica's reported load.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.autoscaling import deployment_options
from cluster.config import ClusterConfig, PoolConfig
from cluster.placement import replica_placement
from decode_worker.worker import DecodeWorker
from kvstore.messages import EngineSpec
from prefill_worker.worker import PrefillWorker
from router.app import Router, RouterSpec

_REQUEST_ROUTER = "router.replica_router:PDRequestRouter"
ROUTER_CONTROL_SLOTS = 32  # beyond the admitted generate requests: health, metrics, dashboard polls


def kv_namespace(cfg: ClusterConfig, model_dir: Path) -> dict[str, Any]:
    """The store namespace (kvstore.hashing.KVNamespace fields) shared by router and engines."""
    engine = cfg.prefill.engine
    return {
        "model": str(model_dir),
        "dtype": engine.dtype,
        "layout": f"{cfg.device}/bs{engine.block_size}",
        "tp_rank": 0,
        "chunk_tokens": cfg.kvstore.chunk_tokens,
    }


def engine_spec(cfg: ClusterConfig, pool: PoolConfig, role: str, model_dir: Path, redis_url: str) -> EngineSpec:
    e = pool.engine
    return EngineSpec(
        model=str(model_dir),
        served_model_name=served_name(cfg, model_dir),
        role=role,
        kv_role="kv_both" if role == "prefill" else "kv_consumer",
        device=cfg.device,
        dtype=e.dtype,
        block_size=e.block_size,
        max_model_len=e.max_model_len,
        enforce_eager=e.enforce_eager,
        enable_prefix_caching=e.enable_prefix_caching,
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        stream_interval=e.stream_interval,
        kv_cache_gib=e.kv_cache_gib,
        gpu_memory_utilization=e.gpu_memory_utilization,
        kv_cache_memory_bytes=e.kv_cache_memory_bytes,
        tensor_parallel_size=pool.tensor_parallel_size,
        cpu_binding=tuple(pool.cpu_binding),
        redis_url=redis_url,
        store_prefix=cfg.kvstore.prefix,
        store_transport=cfg.kvstore.transport,
        store_gpu_tier_mb=cfg.kvstore.gpu_tier_mb,
        store_replicate_after=cfg.kvstore.replicate_after,
        store_tls=cfg.kvstore.tls_files(),
        namespace=kv_namespace(cfg, model_dir),
    )


def served_name(cfg: ClusterConfig, model_dir: Path) -> str:
    return cfg.served_model_name or model_dir.name


def pool_deployment(cls: type, role: str, pool: PoolConfig, cfg: ClusterConfig) -> Any:
    """One pool as a Serve deployment: its replicas' resources, each replica one placement
    group on one node (``cluster.placement``; the pool's ``resources`` pin it to the node
    types that offer them), its size (fixed, or autoscaled on its role's
    signal: ``cluster.autoscaling``) and pdserve's request router."""
    return serve.deployment(
        cls,
        name=role,
        **deployment_options(role, pool, cfg.router.prefill_prior_tps),
        max_ongoing_requests=pool.max_ongoing_requests,
        max_queued_requests=pool.max_queued_requests,
        **replica_placement(pool),
        request_router_config=RequestRouterConfig(
            request_router_class=_REQUEST_ROUTER,
            request_router_kwargs={"policy": cfg.router.policy, "role": role},
            request_routing_stats_period_s=0.5,
        ),
        # Engine start takes tens of seconds on CPU; don't let Serve call it unhealthy.
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=60,  # covers the engine's own shutdown grace
    )


def controller_options(transport: str) -> dict[str, Any]:
    """``serve.start``'s controller options for ``router.serve_transport``. The controller's
    environment reaches the HTTP proxies it starts, and with RAY_SERVE_USE_GRPC_BY_DEFAULT
    their calls to the router replicas go over Serve's gRPC too (the router's own engine
    calls are set per handle: ``router.app.over_transport``). Serve applies these only when it
    creates its controller."""
    if transport == "ray":
        return {}
    return {"runtime_env": {"env_vars": {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}}}


def build_app(cfg: ClusterConfig, model_dir: Path, redis_url: str, api_key_digests: list[str] | None = None) -> Any:
    prefill = pool_deployment(PrefillWorker, "prefill", cfg.prefill, cfg).bind(
        asdict(engine_spec(cfg, cfg.prefill, "prefill", model_dir, redis_url))
    )
    decode = pool_deployment(DecodeWorker, "decode", cfg.decode, cfg).bind(
        asdict(engine_spec(cfg, cfg.decode, "decode", model_dir, redis_url))
    )
    spec = RouterSpec(
        model_dir=str(model_dir),
        served_model_name=served_name(cfg, model_dir),
        max_model_len=min(cfg.prefill.engine.max_model_len, cfg.decode.engine.max_model_len),
        default_max_tokens=cfg.router.default_max_tokens,
        max_body_bytes=cfg.router.max_body_bytes,
        namespace=kv_namespace(cfg, model_dir),
        redis_url=redis_url,
        store_prefix=cfg.kvstore.prefix,
        store_tls=cfg.kvstore.tls_files(),
        prefill_prior_tps=cfg.router.prefill_prior_tps,
        router_replicas=cfg.router.replicas,
        metrics_export_s=cfg.router.metrics_export_s,
        api_key_digests=list(api_key_digests or []),
        max_inflight_requests=cfg.router.max_inflight_requests,
        retry_after_s=cfg.router.retry_after_s,
        request_timeout_s=cfg.router.request_timeout_s,
        prefill_attempts=cfg.router.prefill_attempts,
        decode_resumes=cfg.router.decode_resumes,
        decode_stream=cfg.router.decode_stream,
        serve_transport=cfg.router.serve_transport,
    )
    # Serve's default cap (5 requests per replica) would queue requests in the HTTP proxy,
    # unseen and unbounded: the router takes all it admits, and answers 429 past that itself.
    router = serve.deployment(Router, name="router", num_replicas=cfg.router.replicas,
                              max_ongoing_requests=cfg.router.max_inflight_requests + ROUTER_CONTROL_SLOTS,
                              ray_actor_options={"num_cpus": 0, "resources": dict(cfg.router.resources)})
    return router.bind(asdict(spec), prefill, decode)
