"""Per-role autoscaling through real Ray Serve: prompt-heavy load scales the prefill pool up
and leaves decode alone; when the load falls to a trickle, prefill scales back down while
requests keep flowing, and not one fails (a replica being removed is drained first).

Fake engines with a speed (``FakePrefill(s_per_token)``): prompts are computed one at a time
per replica, so prompt work queues up as it would in a real engine. The subject is the
control plane's policies (``cluster.autoscaling``) inside Serve's autoscaler, and the
deployments built the way ``pdserve up`` builds them (``cluster.app.pool_deployment``)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import ray
from ray import serve

from cluster.app import pool_deployment
from cluster.config import ClusterConfig
from cluster.model import prepare_default_model
from cluster.runtime import free_port, wait_until
from router.app import Router, RouterSpec

from .fakes import MODEL, ZERO, FakeDecode, FakePrefill

APP = "autoscale"
# About 200 prompt tokens: 0.4 s of prefill each at the fake's speed.
PROMPT = "Summarise the history of the printing press in Europe, with dates. " * 16
S_PER_TOKEN = 0.002


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    # Replicas report their autoscaling metrics every 10 s by default: 0.5 s keeps the test short.
    saved = os.environ.get("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S")
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    ray.init(num_cpus=2, namespace="pdserve-autoscaling-test", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    scaling = "{min_replicas: 1, max_replicas: 3, upscale_delay_s: 1, downscale_delay_s: 4, look_back_period_s: 2"
    cfg = ClusterConfig.load(None, [
        "prefill.cpus_per_replica=0", "decode.cpus_per_replica=0",
        f"prefill.autoscaling={scaling}, target_queue_s: 0.5}}",
        f"decode.autoscaling={scaling}, target_inflight: 8}}",
    ])
    prefill = pool_deployment(FakePrefill, "prefill", cfg.prefill, cfg).bind(S_PER_TOKEN)
    decode = pool_deployment(FakeDecode, "decode", cfg.decode, cfg).bind()
    spec = RouterSpec(model_dir=str(prepare_default_model()), served_model_name=MODEL, max_model_len=1024,
                      default_max_tokens=2, max_body_bytes=64 * 1024,
                      namespace={"model": "m", "dtype": "float32", "layout": "cpu/bs32", "chunk_tokens": 32})
    router = serve.deployment(Router, name="router", ray_actor_options=ZERO)
    serve.run(router.bind(spec.__dict__, prefill, decode), name=APP)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", None)
        else:
            os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = saved


def running(role: str) -> int:
    states = serve.status().applications[APP].deployments[role].replica_states
    return int(states.get("RUNNING", 0))


class Load:
    """``clients`` closed-loop clients sending prompt-heavy requests (2 output tokens)."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.statuses, self._stop = url, Counter[int](), threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=120) as http:
            n = 0
            while not self._stop.is_set():
                body = {"model": MODEL, "prompt": f"[{i}.{n}] {PROMPT}", "max_tokens": 2}
                try:
                    code = http.post(self.url + "/v1/completions", json=body).status_code
                except httpx.HTTPError:
                    code = -1  # a dropped connection counts as a failure
                self.statuses[code] += 1
                n += 1

    def stop(self) -> Counter[int]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)
        return self.statuses


def test_prefill_load_scales_prefill_only_then_back_down_without_a_failure(base_url: str) -> None:
    assert running("prefill") == 1 and running("decode") == 1
    heavy = Load(base_url, clients=10)
    decode_seen: set[int] = set()

    def prefill_scaled() -> bool:
        decode_seen.add(running("decode"))
        return running("prefill") >= 2

    try:
        wait_until(prefill_scaled, 90, "prefill scaled up under prompt load")
        time.sleep(3)  # the load goes on: decode's signal must still not move it
        decode_seen.add(running("decode"))
    finally:
        heavy_statuses = heavy.stop()
    assert decode_seen == {1}, f"decode scaled on prefill's load: {decode_seen}"
    peak = running("prefill")

    trickle = Load(base_url, clients=1)  # requests keep arriving while replicas are drained
    try:
        wait_until(lambda: running("prefill") == 1, 90, "prefill scaled back down")
        time.sleep(1)
    finally:
        trickle_statuses = trickle.stop()
    assert running("decode") == 1
    statuses = heavy_statuses + trickle_statuses
    assert set(statuses) == {200} and trickle_statuses[200] > 0, (statuses, f"peak prefill replicas {peak}")
