"""Monolithic reference: one plain vLLM engine (no connector) on both cores, greedy.

Run as a script (vLLM spawns engine processes; keep it out of the pytest process):
    python -m tests.e2e.reference IN.json OUT.json
IN: {"model": dir, "max_model_len": n, "max_tokens": n, "prompts": [[ids...], ...]}
OUT: [{"token_ids": [...], "top2": [[lp1, lp2], ...]}, ...]
"""

from __future__ import annotations

import json
import os
import sys


def main(src: str, dst: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(src).read())
    llm = LLM(model=spec["model"], dtype="float32", block_size=32, enforce_eager=True,
              max_model_len=spec["max_model_len"], enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], logprobs=2)
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
