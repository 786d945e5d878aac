"""A back-of-the-envelope capacity (requests/s) of a cluster for a request stream, from the
cost model alone: where to center a rate sweep, so it straddles the knee at any size.

    prefill: replica seconds per request = compute tokens * (prefill_token_s + prefill_step_s
             / max_num_batched_tokens) + reused tokens * remote_token_s, with "ideal reuse"
             (every chunk seen before in the stream is in the store), over the prefill pool
    decode:  the batch the KV cache holds (at most decode_max_seqs), its step time, tokens/s
             over the mean output length, less the steps stalled by joining sequences' KV
             loads, over the decode pool

The smaller of the two. It is an estimate for choosing rates, not a result: the sweep
measures where each policy actually stops meeting its SLOs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.sim.profiles import CostModel
from bench.sim.workload import SimRequest


@dataclass(frozen=True)
class Capacity:
    prefill_rps: float
    decode_rps: float
    reuse: float  # fraction of prompt tokens an ideal store would serve

    @property
    def rps(self) -> float:
        return min(self.prefill_rps, self.decode_rps)


def estimate(requests: Sequence[SimRequest], cost: CostModel, n_prefill: int, n_decode: int) -> Capacity:
    if not requests:
        raise ValueError("no requests to estimate a capacity from")
    ct = cost.chunk_tokens
    seen: set[bytes] = set()
    work = reused_total = prompt_total = 0.0
    for r in sorted(requests, key=lambda r: r.arrival_s):
        limit = (r.prompt_tokens - 1) // ct
        reused = 0
        for key in r.keys[:limit]:
            if key not in seen:
                break
            reused += 1
        seen.update(r.keys)
        compute = r.prompt_tokens - reused * ct
        work += compute * (cost.prefill_token_s + cost.prefill_step_s / cost.max_num_batched_tokens)
        work += reused * ct * cost.remote_token_s
        reused_total += reused * ct
        prompt_total += r.prompt_tokens
    n = len(requests)
    prefill_rps = n_prefill * n / work
    decoded = [r for r in requests if r.output_tokens > 1] or list(requests)
    out = sum(r.output_tokens - 1 for r in decoded) / len(decoded)
    ctx = sum(r.prompt_tokens + r.output_tokens / 2 for r in decoded) / len(decoded)
    batch = max(1, min(cost.decode_max_seqs, int(cost.decode_kv_tokens / (ctx + out / 2))))
    step = cost.decode_step_time(batch, int(batch * ctx))
    steady = batch / step / max(out, 1.0)  # requests/s of one replica that never stalls
    # every join stalls the whole batch for its KV load and tail (half of them from this node)
    prompt = sum(r.prompt_tokens for r in decoded) / len(decoded)
    join_s = prompt * (cost.same_node_token_s + cost.remote_token_s) / 2 + ct * cost.prefill_token_s / 2
    decode_rps = n_decode * steady / (1.0 + join_s * steady)
    return Capacity(prefill_rps, decode_rps, reused_total / prompt_total)
