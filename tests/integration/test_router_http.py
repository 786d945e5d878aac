"""The router's HTTP API through real Ray Serve, with fake engines (the engines are not the
subject here): every kind of bad input gets an OpenAI-style error and the server keeps
serving the next request; the kv_aware policy routes through Serve's request router with
what the ingress learned, and explains each decision."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.runtime import free_port, wait_until
from cluster.status import render as render_status

from .fakes import MODEL, router_with_fakes

RAY_METRICS_PORT = free_port()  # this node's metrics agent: Ray's export, as Ray's Prometheus scrapes it


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with router_with_fakes("pdserve-http-test", {"metrics_export_s": 1.0}, prefill=(2, ()),
                           _metrics_export_port=RAY_METRICS_PORT) as url:
        yield url


def post(url: str, path: str, body: Any, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


OK_COMPLETION = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3}


def test_completion_and_chat_whole(base_url: str) -> None:
    r = post(base_url, "/v1/completions", {**OK_COMPLETION, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == " Paris.." and body["choices"][0]["token_ids"] == [42, 43, 44]
    assert body["usage"]["completion_tokens"] == 3
    assert body["pdserve"]["prefill_replica"].startswith("prefill-")
    assert body["pdserve"]["decode_replica"].startswith("fake-d")
    r = post(base_url, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == " Paris."


def test_streaming_sends_first_token_then_decode_then_done(base_url: str) -> None:
    body = {**OK_COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks[:-1]]
    # The first token alone, at once; the decode's after it (one chunk each, or together when
    # they reached the router at once: the fake decodes with no delay).
    assert texts[0] == " Paris" and "".join(texts[1:]) == ".." and len(texts) in (2, 3)
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_kv_aware_sends_a_repeated_prompt_where_its_kv_is_and_explains_why(base_url: str) -> None:
    long_prompt = {**OK_COMPLETION, "prompt": "The history of the Roman Empire, told briefly: " * 9}

    def cached_somewhere() -> bool:  # the engines' KV events have reached the router's index
        r = post(base_url, "/v1/completions", long_prompt)
        assert r.status_code == 200, r.text
        why = httpx.get(f"{base_url}/debug/routes/{r.headers['x-pdserve-request-id']}").json()
        return any(c["own_tokens"] > 0 for c in why["prefill"]["candidates"])

    wait_until(cached_somewhere, 20, "KV events to reach the router")
    home = post(base_url, "/v1/completions", long_prompt).json()["pdserve"]["prefill_replica"]
    for _ in range(4):  # the replica whose own cache holds the prompt wins every time
        again = post(base_url, "/v1/completions", long_prompt)
        assert again.json()["pdserve"]["prefill_replica"] == home
    header = again.headers["x-pdserve-route"]
    assert header.startswith("policy=kv_aware; chosen=" + home.removeprefix("prefill-"))
    rid = again.headers["x-pdserve-request-id"]
    why = httpx.get(f"{base_url}/debug/routes/{rid}").json()
    candidates = why["prefill"]["candidates"]
    assert len(candidates) == 2 and why["decode"]["policy"] == "kv_aware"
    best, other = candidates
    assert best["replica"] == home.removeprefix("prefill-") and best["own_tokens"] >= 64 and other["own_tokens"] == 0
    assert best["score"] < other["score"]
    assert httpx.get(f"{base_url}/debug/routes/nope").status_code == 404
    assert len(httpx.get(f"{base_url}/debug/routes?last=3").json()) == 3
    view = httpx.get(f"{base_url}/debug/replicas").json()  # the scores' inputs, per replica
    assert {best["replica"], other["replica"]} <= set(view["replicas"]) and view["prefill_prior_tps"] > 0


def test_dashboard_page_and_its_numbers_move_under_load(base_url: str) -> None:
    page = httpx.get(base_url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "dashboard/data" in page.text
    post(base_url, "/v1/completions", OK_COMPLETION)  # both pools' request routers exist now
    before = httpx.get(base_url + "/dashboard/data").json()
    for _ in range(6):
        assert post(base_url, "/v1/completions", OK_COMPLETION).status_code == 200

    def moved() -> bool:  # the replicas' reports (every 0.2 s) reach the rates (>= 1 s apart)
        after = httpx.get(base_url + "/dashboard/data").json()
        return bool(after["pools"]["decode"][0]["output_tokens_per_s"])

    wait_until(moved, 20, "the decode pool's output rate")
    after = httpx.get(base_url + "/dashboard/data").json()
    assert after["requests"]["requests"] >= before["requests"]["requests"] + 6
    assert after["requests"]["ttft_s"]["p50"] > 0 and after["requests"]["tpot_s"]["p50"] > 0
    assert len(after["pools"]["prefill"]) == 2 and len(after["pools"]["decode"]) == 1
    decode = after["pools"]["decode"][0]
    assert decode["kv_usage"] == 0.25 and decode["output_tokens_per_s"] > 0
    assert after["store"] == {"available": False}  # this router runs without a store
    metrics = httpx.get(base_url + "/metrics").text  # the same numbers for Prometheus
    requests_total = next(float(line.split()[1]) for line in metrics.splitlines()
                          if line.startswith("pdserve_requests_total "))
    assert requests_total >= after["requests"]["requests"] and "pdserve_replica_generated_tokens_total{" in metrics


def test_metrics_go_out_through_rays_export_equal_to_the_routers_own(base_url: str) -> None:
    """Ray's metrics agent serves the router's families as ray_pdserve_* (what Ray's
    Prometheus and Grafana read), with the same numbers as the router's /metrics."""
    for _ in range(3):
        assert post(base_url, "/v1/completions", OK_COMPLETION).status_code == 200

    def samples(url: str, prefix: str = "") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        families = text_string_to_metric_families(httpx.get(url, timeout=30).text)
        return {(s.name.removeprefix(prefix), tuple(sorted((k, v) for k, v in s.labels.items() if k in MINE))): s.value
                for f in families for s in f.samples if s.name.startswith(prefix + "pdserve_")}

    def caught_up() -> bool:  # the export runs every second; Ray's agent publishes on its own period
        return samples(base_url + "/metrics") == samples(f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics", "ray_")

    wait_until(caught_up, 90, "Ray's export to hold what /metrics holds", interval_s=2)
    rays = samples(f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics", "ray_")
    assert rays[("pdserve_requests_total", ())] >= 3 and rays[("pdserve_request_ttft_seconds_count", ())] >= 3
    assert {k for k in rays if k[0] == "pdserve_replica_prompt_tokens_total"}  # per replica, with role and node


MINE = {"role", "replica", "node", "le", "source", "transport", "direction"}  # Ray adds its own tags


def test_models_and_health(base_url: str) -> None:
    assert httpx.get(base_url + "/health").status_code == 200
    assert httpx.get(base_url + "/v1/models").json()["data"][0]["id"] == MODEL


@pytest.mark.parametrize("path,body,raw,status,param", [
    ("/v1/completions", None, b"{not json", 400, None),
    ("/v1/completions", None, b"[1, 2]", 400, None),
    ("/v1/completions", {**OK_COMPLETION, "model": "gpt-4"}, None, 404, "model"),
    ("/v1/completions", {**OK_COMPLETION, "max_tokens": 0}, None, 400, "max_tokens"),
    ("/v1/completions", {**OK_COMPLETION, "max_tokens": 10_000}, None, 400, "max_tokens"),
    ("/v1/completions", {**OK_COMPLETION, "prompt": "word " * 500}, None, 400, "prompt"),
    ("/v1/completions", {**OK_COMPLETION, "prompt": [1, 2, 10**9]}, None, 400, "prompt"),
    ("/v1/completions", {**OK_COMPLETION, "n": 3}, None, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None, 400,
     "messages"),
    ("/v1/completions", None, b'{"model": "tiny", "prompt": "' + b"x" * 70_000 + b'"}', 413, None),
    ("/v1/nope", {}, None, 404, None),
])
def test_bad_input_gets_openai_errors_and_server_keeps_serving(
    base_url: str, path: str, body: Any, raw: bytes | None, status: int, param: str | None
) -> None:
    r = post(base_url, path, body, raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] and err["param"].startswith(param)
    assert post(base_url, "/v1/completions", OK_COMPLETION).status_code == 200


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """Debian's Chromium, headless (deploy/test.sh installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is missing: deploy/test.sh installs Debian's chromium package"
    return subprocess.run([path, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", *args], capture_output=True, text=True, timeout=180)


def test_dashboard_in_a_real_browser_moves_with_load_and_agrees_with_status(base_url: str, tmp_path: Path) -> None:
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            post(base_url, "/v1/completions", OK_COMPLETION)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:  # the page's script runs in the browser: fetch, render; the DOM is dumped after it
        page = base_url + "/dashboard"
        first = _chromium("--virtual-time-budget=3000", "--dump-dom", page).stdout
        time.sleep(1.5)
        second = _chromium("--virtual-time-budget=3000", "--dump-dom", page).stdout
        shot = tmp_path / "dashboard.png"
        _chromium("--virtual-time-budget=3000", "--window-size=1280,1400", f"--screenshot={shot}", page)
    finally:
        stop.set()
        worker.join(30)

    def served(dom: str) -> int:  # the "requests in last 300s" card
        found = re.search(r"requests in last \d+s</span><b>(\d+)</b>", dom)
        assert found, dom[:2000]
        return int(found.group(1))

    assert 0 < served(first) < served(second)  # live: the numbers move under load
    data = httpx.get(base_url + "/dashboard/data").json()
    status = render_status(data)
    for replica in [r["replica"] for pool in data["pools"].values() for r in pool]:
        assert f"<td>{replica}</td>" in second and replica in status  # same replicas as pdserve status
    metrics = httpx.get(base_url + "/metrics").text
    total = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("pdserve_requests_total "))
    assert total >= served(second)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
