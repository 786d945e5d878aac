"""One pdserve cluster (1 prefill + 1 decode replica on the one GPU, started with the real
CLI as the e2e suite does) and the monolithic vLLM reference on the same GPU, computed first.

The model is tools/gpu/make_tiny_llama.py's Llama (4 layers x 512) with seeded random
weights written to a checkpoint once: both sides load the same bytes, no hub, nothing carried.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.tokenizer import PromptTokenizer
from tests.e2e.conftest import Cluster, running_pdserve
from tests.e2e.prompts import EQUIVALENCE
from tests.gpu.device import DEVICE

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
MAX_TOKENS = 24
MAX_MODEL_LEN = 2048
BLOCK = 32  # cluster.yaml: engine block_size and kvstore.chunk_tokens
MODEL_NAME = "tiny-llama"
KV_CACHE_BYTES = 8 << 30  # per engine on CUDA (kv_cache_memory_bytes): 2M tokens of this model
PROMPTS = list(EQUIVALENCE)  # 22 prompts of 14 to 1071 tokens with this tokenizer, 121 full chunks


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert DEVICE is not None
    out = tmp_path_factory.mktemp("model") / MODEL_NAME
    subprocess.run([sys.executable, str(REPO / "tools/gpu/make_tiny_llama.py"), str(out), "--layers", "4",
                    "--hidden", "512", "--heads", "8", "--kv-heads", "4", "--vocab", "0", "--max-pos", "4096",
                    "--weights-seed", "0", "--dtype", DEVICE.dtype], check=True, timeout=120)
    return out


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> PromptTokenizer:
    return PromptTokenizer(model_dir)


@pytest.fixture(scope="session")
def reference(model_dir: Path, tokenizer: PromptTokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """prompt text -> {"token_ids", "top2"} from one monolithic vLLM engine, greedy."""
    assert DEVICE is not None
    d = tmp_path_factory.mktemp("reference")
    spec = {"model": str(model_dir), "device": DEVICE.name, "dtype": DEVICE.dtype, "block_size": BLOCK,
            "max_model_len": MAX_MODEL_LEN, "max_tokens": MAX_TOKENS, "gpu_memory_utilization": 0.25,
            "ignore_eos": True, "seed": 0,
            "prompts": [tokenizer.encode(t) for t in PROMPTS]}
    (d / "in.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "tests.e2e.reference", str(d / "in.json"), str(d / "out.json")],
                   check=True, timeout=300, cwd=REPO)
    return dict(zip(PROMPTS, json.loads((d / "out.json").read_text()), strict=True))


@pytest.fixture(scope="module")
def cluster(reference: dict, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assert DEVICE is not None
    sets = [f"model={model_dir}", f"device={DEVICE.name}", f"prefill.engine.dtype={DEVICE.dtype}",
            f"decode.engine.dtype={DEVICE.dtype}"]
    if DEVICE.name == "cuda":
        sets += ["prefill.gpus_per_replica=0.4", "decode.gpus_per_replica=0.4",
                 "prefill.cpu_binding=[]", "decode.cpu_binding=[]"]
        # Both engines start at once on the one GPU: a fixed KV cache each, so neither sizes
        # its cache from free memory the other is taking meanwhile (vLLM's profiling race).
        sets += [f"{pool}.engine.kv_cache_memory_bytes={KV_CACHE_BYTES}" for pool in ("prefill", "decode")]
    with running_pdserve(tmp_path_factory.mktemp("pdserve-home"), HERE / "cluster.yaml", sets) as c:
        yield c
