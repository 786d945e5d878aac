"""What crosses the router <-> engine-replica boundary, as msgpack (no pickle on the wire).

Ray handle calls carry these as ``bytes``; the role of a replica (prefill or decode) only
changes which fields it uses (a prefill call always runs ``max_tokens=1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-k alternatives per token; None = no logprobs
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    token_ids: tuple[int, ...]
    sampling: SamplingSpec

    def encode(self) -> bytes:
        s = self.sampling
        return msgpack.packb(
            [
                self.request_id,
                list(self.token_ids),
                [s.max_tokens, s.temperature, s.top_p, s.seed, list(s.stop), s.logprobs, s.ignore_eos],
            ]
        )

    @classmethod
    def decode(cls, raw: bytes) -> EngineRequest:
        rid, ids, (mt, temp, top_p, seed, stop, lp, ign) = msgpack.unpackb(raw)
        return cls(rid, tuple(ids), SamplingSpec(mt, temp, top_p, seed, tuple(stop), lp, ign))


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class EngineDelta:
    """New tokens since the previous delta of the same request."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens the engine did not compute (local + store)
    replica: str = ""
    engine_s: float = 0.0  # seconds since the replica received the request (queue + compute)

    def encode(self) -> bytes:
        lps: Any = None
        if self.logprobs is not None:
            lps = [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in self.logprobs]
        return msgpack.packb(
            [list(self.token_ids), self.text, lps, self.finish_reason,
             self.num_prompt_tokens, self.num_cached_tokens, self.replica, self.engine_s]
        )

    @classmethod
    def merge(cls, deltas: list[EngineDelta]) -> EngineDelta:
        """Consecutive deltas of one request as one (as vLLM merges the outputs of a request
        whose reader fell behind): the tokens, text and logprobs of all, the first's request
        facts, the last's finish."""
        if len(deltas) == 1:
            return deltas[0]
        first, last = deltas[0], deltas[-1]
        logprobs = None
        if any(d.logprobs is not None for d in deltas):
            logprobs = tuple(lp for d in deltas for lp in d.logprobs or ())
        return cls(tuple(t for d in deltas for t in d.token_ids), "".join(d.text for d in deltas), logprobs,
                   last.finish_reason, first.num_prompt_tokens, first.num_cached_tokens, first.replica,
                   last.engine_s)

    @classmethod
    def decode(cls, raw: bytes) -> EngineDelta:
        ids, text, lps, finish, n_prompt, n_cached, replica, engine_s = msgpack.unpackb(raw)
        logprobs = None
        if lps is not None:
            logprobs = tuple(
                TokenLogprob(t, lp, tuple((a, b) for a, b in top)) for t, lp, top in lps
            )
        return cls(tuple(ids), text, logprobs, finish, n_prompt, n_cached, replica, engine_s)


@dataclass(frozen=True)
class ReplicaLoad:
    """What a replica reports to the router's request router every stats period."""

    replica: str
    node_id: str
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    inflight: int = 0
    queued_tokens: int = 0  # prompt tokens of the requests in flight (an upper bound of work)
    computed_tokens: int = 0  # prompt tokens computed since start (not loaded): cumulative
    busy_s: float = 0.0  # seconds with at least one request in flight: cumulative
    kv_events: str = ""  # where its engine publishes KV cache events ("" = no prefix cache)
    # cumulative, for the dashboard's rates: prompt tokens prefilled, of them cached (own
    # cache or store), output tokens generated
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0


# What each replica reports to Serve's autoscaler (``record_autoscaling_stats``), by name:
# the control plane's per-role policies (``cluster.autoscaling``) read these.
SCALING_QUEUED_TOKENS = "queued_tokens"  # prompt tokens waiting for their first token
SCALING_PREFILL_TPS = "prefill_tps"  # prompt tokens computed per busy second; 0 = not measured yet
SCALING_INFLIGHT = "inflight"  # requests in flight at the replica (decode: sequences streaming)
SCALING_KV_USAGE = "kv_usage"  # the engine's KV cache, fraction in use


def scaling_stats(load: ReplicaLoad, min_busy_s: float = 1.0) -> dict[str, float]:
    """A replica's load in the autoscaler's terms: plain numbers, each averaged by Serve over
    its look-back window. The rate counts only once the replica has been busy a while (a
    first short burst says little about its speed)."""
    tps = load.computed_tokens / load.busy_s if load.busy_s >= min_busy_s and load.computed_tokens else 0.0
    return {SCALING_QUEUED_TOKENS: float(load.queued_tokens), SCALING_PREFILL_TPS: tps,
            SCALING_INFLIGHT: float(load.inflight), SCALING_KV_USAGE: load.kv_usage}


@dataclass(frozen=True)
class EngineSpec:
    """Everything a replica needs to build its engine; built by the control plane."""

    model: str
    served_model_name: str
    role: str  # "prefill" | "decode": only names the replica and picks kv_role
    kv_role: str  # vLLM's kv_producer | kv_consumer | kv_both
    device: str  # "cpu" | "cuda"
    dtype: str
    block_size: int
    max_model_len: int
    enforce_eager: bool
    enable_prefix_caching: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_gib: int  # CPU KV pool (VLLM_CPU_KVCACHE_SPACE, whole GiB)
    gpu_memory_utilization: float
    cpu_binding: tuple[str, ...]  # per local replica rank, e.g. ("0", "1"); empty = vLLM's default
    redis_url: str
    store_prefix: str
    store_transport: str  # tcp | grpc, for chunks held by other nodes
    namespace: dict[str, Any]  # kvstore.hashing.KVNamespace fields (TP ranks > 0: rank_key)
    tensor_parallel_size: int = 1  # ranks of this replica's engine, in its placement group
    store_tls: dict[str, str] | None = None  # kvstore.peer_auth.TlsFiles fields (grpc transport)
    kv_cache_memory_bytes: int | None = None  # GPU: a fixed KV cache size (vLLM skips its profiling)
    stream_interval: int = 1  # output tokens per streamed delta (vLLM's stream_interval)
    store_gpu_tier_mb: int = 0  # CUDA: each prefill worker's device tier (kvstore/transport/cuda_ipc.py); 0 = off
    store_replicate_after: int = 0  # pulls from other nodes that make a chunk a replica here; 0 = off

    @property
    def executor_backend(self) -> str | None:
        """vLLM's ``distributed_executor_backend`` for this replica's ranks: Ray actors in the
        replica's placement group on GPUs (``cluster.placement`` gives one GPU bundle per
        rank), child processes of the engine on CPUs; None (vLLM's choice) for one rank."""
        if self.tensor_parallel_size == 1:
            return None
        return "ray" if self.device == "cuda" else "mp"
