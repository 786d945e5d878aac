"""Tensor parallelism through the store: a TP=2 prefill engine saves every rank's shard under
that rank's key, a TP=2 decode engine loads them (each worker its own shard), and greedy
output equals a monolithic TP=2 engine's token for token. One rank's shard is then damaged:
only that rank's load fails, and vLLM recomputes the blocks on both ranks, still exact.

The default model (9 heads, 3 KV heads) cannot be split in two, so this runs a small Llama
with seeded random weights (4 heads, 2 KV heads: one KV head per rank) and the default
model's tokenizer, written once per run. The engines run one after another in one child
process (vLLM spawns its workers: keep them out of pytest), each rank bound to its own core:

    python -m tests.e2e.test_tensor_parallel IN.json OUT.json   (waits for "go" on stdin
                                                                 between prefill and decode)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvstore.hashing import KVNamespace, chunk_keys, rank_key
from kvstore.metadata import MetadataStore, connect
from kvstore.segment import HEADER_BYTES, SHM_DIR
from tests.e2e.helpers import assert_matches_reference
from tests.integration.conftest import AgentFactory, make_agent  # noqa: F401  (the fixture, reused)

TP = 2
BLOCK = 32
MAX_TOKENS = 16
PROMPT_LENS = (200, 150)  # prompt 1's rank-1 shard of chunk 1 gets damaged before decode
pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SAVED = "PDSERVE-TP-SAVED"


def _tp_shm() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith("vllm_dist_")}


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(100, 49_000) for _ in range(n)] for n in PROMPT_LENS]


def test_tp2_engines_share_prefill_kv_rank_by_rank(
    model_dir: Path, redis_url: str, prefix: str, make_agent: AgentFactory, tmp_path: Path  # noqa: F811
) -> None:
    agent = make_agent("node-tp", capacity=64 << 20, alive_ttl_ms=600_000)
    tiny = tmp_path / "tiny-llama-tp"
    spec: dict[str, Any] = {"tokenizer_from": str(model_dir), "model": str(tiny), "redis_url": redis_url,
                            "prefix": prefix, "node_id": "node-tp", "prompts": _prompts(), "max_tokens": MAX_TOKENS}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    # Workers SIGTERMed after vLLM's 5 s shutdown grace leave their TP shared memory behind
    # (/dev/shm/vllm_dist_*-cpushm_*): give them time to exit on their own.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": "30"}
    shm_before = _tp_shm()
    log = (tmp_path / "engines.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tests.e2e.test_tensor_parallel", str(tmp_path / "in.json"),
                             str(tmp_path / "out.json")], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        for line in proc.stdout:  # vLLM logs here too; the prefill engine is done at SAVED
            if line.strip() == SAVED:
                break
            log.write(line)
        else:
            pytest.fail(f"engines failed before decode; see {log.name}")
        meta = MetadataStore(connect(redis_url), prefix)
        ns = KVNamespace(model=str(tiny), dtype="float32", layout=f"cpu/bs{BLOCK}", chunk_tokens=BLOCK)
        keys = [chunk_keys(ns, p) for p in spec["prompts"]]
        for ks in keys:  # every rank saved every full chunk, each under its own key
            shards = [rank_key(k, r, TP) for k in ks for r in range(TP)]
            assert all(loc is not None for loc in meta.lookup(shards))
        damaged = meta.lookup([rank_key(keys[1][1], 1, TP)])[0]
        assert damaged is not None
        agent.segment.buf[damaged.offset + HEADER_BYTES + damaged.length // 2] ^= 0x5A
        proc.stdin.write("go\n")
        proc.stdin.close()
        log.writelines(proc.stdout)
        assert proc.wait(timeout=300) == 0, f"engines failed; see {log.name}"
    finally:
        if proc.poll() is None:  # the engines' whole process group: workers too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        leaked = _tp_shm() - shm_before
        for name in leaked:
            (Path(SHM_DIR) / name).unlink(missing_ok=True)
    assert not leaked, f"TP engines left shared memory: {sorted(leaked)}"
    out = json.loads((tmp_path / "out.json").read_text())
    for i, prompt in enumerate(spec["prompts"]):
        ref, got = out["reference"][i], out["decode"][i]
        assert_matches_reference(f"prompt {i}", got["token_ids"], ref)
        # the decode engine claimed every full chunk but the last token's: computed < prompt
        assert got["num_cached_tokens"] == (len(prompt) - 1) // BLOCK * BLOCK > 0
    saved, loaded = meta.stats(f"{prefix}-prefill"), meta.stats(f"{prefix}-decode")
    n_chunks = sum(len(ks) for ks in keys)
    assert saved["saved_chunks"] == TP * n_chunks  # counted per rank: one shard each
    assert loaded["lookup_hit_chunks"] == n_chunks  # all of both prompts: every rank's shard was there
    # Prompt 1's chunk 1 failed on rank 1 only (its shard's checksum): rank 1 stopped loading
    # there, rank 0 loaded all its chunks, and vLLM recomputed those blocks on both ranks
    # (the output above is still exact).
    failed = len(keys[1]) - 1
    assert loaded["checksum_failures"] == 1 and loaded["load_failures"] == failed
    assert loaded["loaded_chunks"] == TP * n_chunks - failed


# ------------------------------------------------------------------ the engines' process

def _write_tiny_llama(tokenizer_from: Path, out: Path) -> None:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=TP, max_position_embeddings=1024,
                      tie_word_embeddings=False, initializer_range=0.2, dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).float().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, out / name)


def _run(spec: dict[str, Any], role: str | None) -> list[dict[str, Any]]:
    """One TP=2 engine over the prompts, shut down before returning; role None: no connector."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = None
    if role is not None:
        kv = KVTransferConfig(
            kv_connector="PDStoreConnector", kv_connector_module_path="kvstore.connector",
            kv_role="kv_both" if role == "prefill" else "kv_consumer", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"redis_url": spec["redis_url"], "prefix": spec["prefix"],
                                       "node_id": spec["node_id"], "instance": f"{spec['prefix']}-{role}"})
    llm = LLM(model=spec["model"], tensor_parallel_size=TP, dtype="float32", block_size=BLOCK, enforce_eager=True,
              max_model_len=1024, enable_prefix_caching=False, kv_transfer_config=kv)
    params = SamplingParams(temperature=0, max_tokens=1 if role == "prefill" else spec["max_tokens"], logprobs=2)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params)
    finally:
        llm.llm_engine.engine_core.shutdown(timeout=30)
    result = []
    for out in outs:
        c = out.outputs[0]
        top2 = [sorted((lp.logprob for lp in step.values()), reverse=True)[:2] for step in c.logprobs or []]
        result.append({"token_ids": list(c.token_ids), "top2": top2, "num_cached_tokens": out.num_cached_tokens})
    return result


def main(src: str, dst: str) -> None:
    spec = json.loads(Path(src).read_text())
    t0 = time.monotonic()
    _write_tiny_llama(Path(spec["tokenizer_from"]), Path(spec["model"]))
    reference = _run(spec, None)
    _run(spec, "prefill")
    print(SAVED, flush=True)
    sys.stdin.readline()  # the test checks (and damages) the store meanwhile
    decode = _run(spec, "decode")
    Path(dst).write_text(json.dumps({"reference": reference, "decode": decode}))
    print(f"engines done in {time.monotonic() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
