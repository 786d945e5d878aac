"""Monolithic reference: one plain vLLM engine (no connector), greedy, on the device, dtype
and block size of pdserve's engines (the CPU e2e suite's defaults: both cores, float32, 32).

Run as a script (vLLM spawns engine processes; keep it out of the pytest process):
    python -m tests.e2e.reference IN.json OUT.json
IN: {"model": dir, "max_model_len": n, "max_tokens": n, "prompts": [[ids...], ...]} and,
    for other devices (tests/gpu), optional "device", "dtype", "block_size",
    "gpu_memory_utilization", "ignore_eos", "seed"
OUT: [{"token_ids": [...], "top2": [[lp1, lp2], ...]}, ...]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def main(src: str, dst: str) -> None:
    spec = json.loads(open(src).read())
    if spec.get("device", "cpu") == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra: dict[str, Any] = {k: spec[k] for k in ("gpu_memory_utilization", "seed") if k in spec}
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), block_size=spec.get("block_size", 32),
              enforce_eager=True, max_model_len=spec["max_model_len"], enable_prefix_caching=False, **extra)
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], logprobs=2,
                            ignore_eos=spec.get("ignore_eos", False))
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params)
    result = []
    for out in outs:
        c = out.outputs[0]
        top2 = [sorted((lp.logprob for lp in step.values()), reverse=True)[:2] for step in c.logprobs]
        result.append({"token_ids": list(c.token_ids), "top2": top2})
    with open(dst, "w") as f:
        json.dump(result, f)
    # Shut the engine down with time to exit on its own (a killed one leaves shared memory).
    llm.llm_engine.engine_core.shutdown(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
