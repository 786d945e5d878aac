"""A vLLM async engine with the store connector attached, hosted inside a Serve replica.

Role-agnostic on purpose: the prefill and decode workers differ only in how they call
``generate`` (one token vs. a stream); both load stored prefixes through the connector, and
a producer also saves. Lives beside the connector because it is the one place that wires
the store into an engine (module path, node id, namespace) and it knows no app or role.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from vllm import SamplingParams
from vllm.config import KVEventsConfig, KVTransferConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

from kvstore import janitor
from kvstore.logging import get_logger
from kvstore.messages import EngineDelta, EngineRequest, EngineSpec, ReplicaLoad, TokenLogprob

log = get_logger(__name__)

SHUTDOWN_GRACE_S = 30.0


class _SchedulerGauge(StatLoggerBase):  # type: ignore[misc]
    """Keeps the engine's latest scheduler stats for load reports (no logging)."""

    latest: dict[str, float] = {}

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        pass

    def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
        if scheduler_stats is not None:
            _SchedulerGauge.latest = {
                "running": scheduler_stats.num_running_reqs,
                "waiting": scheduler_stats.num_waiting_reqs,
                "kv_usage": scheduler_stats.kv_cache_usage,
            }

    def log_engine_initialized(self) -> None:
        pass


def _cpu_env(spec: EngineSpec, local_rank: int) -> None:
    """Pin this replica's engine to its own cores before the engine process is spawned
    (it inherits the environment). Unpinned CPU engines crowd onto one core."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gib)
    if spec.cpu_binding:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpu_binding[local_rank % len(spec.cpu_binding)]
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"


class WorkMeter:
    """This replica's prompt work, for the router's cost model: prompt tokens waiting for
    their first token, prompt tokens computed (not loaded) so far, and busy seconds (time
    with at least one request in flight); the router divides the last two into a rate.
    Cumulative prompt, cached and generated tokens feed the dashboard's rates."""

    def __init__(self) -> None:
        self.inflight = self.queued_tokens = self.computed_tokens = 0
        self.prompt_tokens = self.cached_tokens = self.generated_tokens = 0
        self._busy_total, self._busy_since = 0.0, 0.0

    def started(self, n_prompt: int) -> None:
        if self.inflight == 0:
            self._busy_since = time.monotonic()
        self.inflight += 1
        self.queued_tokens += n_prompt

    def prefilled(self, n_prompt: int, computed: int) -> None:
        self.queued_tokens -= n_prompt
        self.computed_tokens += max(computed, 0)
        self.prompt_tokens += n_prompt
        self.cached_tokens += n_prompt - max(computed, 0)

    def ended(self, n_prompt: int, prefilled: bool) -> None:
        if not prefilled:  # aborted or failed before its first token
            self.queued_tokens -= n_prompt
        self.inflight -= 1
        if self.inflight == 0:
            self._busy_total += time.monotonic() - self._busy_since

    def busy_s(self) -> float:
        running = time.monotonic() - self._busy_since if self.inflight else 0.0
        return self._busy_total + running


def _kv_events(spec: EngineSpec, topic: str) -> tuple[KVEventsConfig | None, str]:
    """A producer with a prefix cache publishes its cache's KV events (ZMQ, topic = the
    replica's routing name) for the router's index; returns the config and the endpoint to
    report ("" when there is nothing to publish)."""
    if spec.kv_role == "kv_consumer" or not spec.enable_prefix_caching:
        return None, ""
    with socket.socket() as s:  # a free port; the engine binds it moments later
        s.bind(("", 0))
        port = s.getsockname()[1]
    config = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://*:{port}", topic=topic)
    return config, f"tcp://{ray.util.get_node_ip_address()}:{port}"


class EngineHost:
    def __init__(self, spec: EngineSpec, replica_name: str, local_rank: int, events_topic: str = "") -> None:
        self.spec = spec
        self.replica = replica_name
        self.node_id = ray.get_runtime_context().get_node_id()
        events, self.kv_events_endpoint = _kv_events(spec, events_topic or replica_name)
        if spec.device == "cpu":
            _cpu_env(spec, local_rank)
        janitor.use_engine_rpc_dir()  # the engine's ZMQ sockets, where a killed one's are swept
        kv = KVTransferConfig(
            kv_connector="PDStoreConnector",
            kv_connector_module_path="kvstore.connector",
            kv_role=spec.kv_role,
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={
                "redis_url": spec.redis_url,
                "prefix": spec.store_prefix,
                "transport": spec.store_transport,
                "gpu_tier_mb": spec.store_gpu_tier_mb,
                "replicate_after": spec.store_replicate_after,
                "tls": spec.store_tls,
                "node_id": self.node_id,
                "instance": replica_name,
                "namespace": dict(spec.namespace),
            },
        )
        args = AsyncEngineArgs(
            model=spec.model,
            served_model_name=[spec.served_model_name],
            dtype=spec.dtype,
            block_size=spec.block_size,
            max_model_len=spec.max_model_len,
            enforce_eager=spec.enforce_eager,
            enable_prefix_caching=spec.enable_prefix_caching,
            max_num_seqs=spec.max_num_seqs,
            max_num_batched_tokens=spec.max_num_batched_tokens,
            stream_interval=spec.stream_interval,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            tensor_parallel_size=spec.tensor_parallel_size,
            distributed_executor_backend=spec.executor_backend,
            kv_transfer_config=kv,
            kv_events_config=events,
            disable_log_stats=False,
            # Only when set: engines sharing a GPU then skip vLLM's memory profiling, in
            # which one engine's KV allocation counts against the other's.
            **({"kv_cache_memory_bytes": spec.kv_cache_memory_bytes}
               if spec.kv_cache_memory_bytes is not None else {}),
        )
        # vLLM's own metrics (vllm:* as ray_vllm_*, tagged with the Serve replica) go out through
        # Ray's metrics export next to pdserve's; outside Ray, vLLM's default Prometheus logger.
        loggers: list[Any] = [_SchedulerGauge]
        if ray.is_initialized():
            loggers.append(RayPrometheusStatLogger)
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=loggers)
        self.work = WorkMeter()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        s = request.sampling
        params = SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=list(s.stop) or None,
            logprobs=s.logprobs,
            ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        prompt = TokensPrompt(prompt_token_ids=list(request.token_ids))
        n_prompt, prefilled = len(request.token_ids), False
        received = time.monotonic()
        self.work.started(n_prompt)
        try:
            async for out in self.engine.generate(prompt, params, request.request_id):
                delta = self._delta(out, s.logprobs is not None, time.monotonic() - received)
                if not prefilled:
                    prefilled = True
                    self.work.prefilled(n_prompt, n_prompt - delta.num_cached_tokens)
                self.work.generated_tokens += len(delta.token_ids)
                yield delta
        finally:
            self.work.ended(n_prompt, prefilled)

    def _delta(self, out: Any, want_logprobs: bool, engine_s: float) -> EngineDelta:
        c = out.outputs[0]
        logprobs = None
        if want_logprobs and c.logprobs is not None:
            logprobs = tuple(
                TokenLogprob(
                    tid,
                    float(step[tid].logprob),
                    tuple(
                        (t, float(lp.logprob))
                        for t, lp in sorted(step.items(), key=lambda kv: kv[1].rank or 0)
                        if lp.rank is not None and lp.rank >= 1
                    ),
                )
                for tid, step in zip(c.token_ids, c.logprobs, strict=False)
            )
        return EngineDelta(
            token_ids=tuple(c.token_ids),
            text=c.text,
            logprobs=logprobs,
            finish_reason=c.finish_reason if out.finished else None,
            num_prompt_tokens=len(out.prompt_token_ids or ()),
            num_cached_tokens=int(out.num_cached_tokens or 0),
            replica=self.replica,
            engine_s=engine_s,
        )

    def load(self) -> ReplicaLoad:
        g = _SchedulerGauge.latest
        return ReplicaLoad(
            replica=self.replica,
            node_id=self.node_id,
            running=int(g.get("running", 0)),
            waiting=int(g.get("waiting", 0)),
            kv_usage=float(g.get("kv_usage", 0.0)),
            inflight=self.work.inflight,
            queued_tokens=self.work.queued_tokens,
            computed_tokens=self.work.computed_tokens,
            busy_s=self.work.busy_s(),
            kv_events=self.kv_events_endpoint,
            prompt_tokens=self.work.prompt_tokens,
            cached_tokens=self.work.cached_tokens,
            generated_tokens=self.work.generated_tokens,
        )

    async def reset_prefix_cache(self) -> bool:
        return bool(await self.engine.reset_prefix_cache())

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        """Stop the engine and let its processes exit on their own. vLLM force-kills them after
        a few seconds by default, and two engines tearing down at once on a small CPU node
        need longer: a killed engine leaves its shared-memory message queues behind."""
        log.info("%s: shutting the engine down", self.replica)
        self.engine.shutdown(timeout=SHUTDOWN_GRACE_S)
        log.info("%s: engine is down", self.replica)
