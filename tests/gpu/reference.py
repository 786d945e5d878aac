"""Monolithic reference for the GPU tests: one plain vLLM engine (no connector), greedy, on
the same device, dtype and block size as pdserve's engines.

Run as a script (vLLM spawns its engine process; keep it out of the pytest process):
    python -m tests.gpu.reference IN.json OUT.json
IN: {"model", "device", "dtype", "block_size", "max_model_len", "max_tokens",
     "gpu_memory_utilization", "prompts": [[ids...], ...]}
OUT: [{"token_ids": [...], "top2": [[lp1, lp2], ...]}, ...]
"""

from __future__ import annotations

import json
import os
import sys


def main(src: str, dst: str) -> None:
    spec = json.loads(open(src).read())
    if spec["device"] == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype=spec["dtype"], block_size=spec["block_size"], enforce_eager=True,
              max_model_len=spec["max_model_len"], enable_prefix_caching=False, seed=0,
              gpu_memory_utilization=spec["gpu_memory_utilization"])
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], logprobs=2, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params)
    result = []
    for out in outs:
        c = out.outputs[0]
        top2 = [sorted((lp.logprob for lp in step.values()), reverse=True)[:2] for step in c.logprobs]
        result.append({"token_ids": list(c.token_ids), "top2": top2})
    with open(dst, "w") as f:
        json.dump(result, f)
    llm.llm_engine.engine_core.shutdown(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
