"""Faults and overload through real Ray Serve, with fake engines that die for real on cue
(their process exits mid-call): a lost prefill replica is retried, a lost decode replica's
stream is resumed with no token repeated or missing, a full router answers 429 with
Retry-After, a request past its deadline is stopped, and a client that goes away has its
engine stream cancelled. The e2e tier repeats the replica faults on real vLLM engines."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.app import ROUTER_CONTROL_SLOTS
from cluster.runtime import wait_until

from .fakes import MODEL, router_with_fakes

DECODE_S_PER_TOKEN = 0.05
MAX_INFLIGHT = 6
TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def base_url(faults: Path) -> Iterator[str]:
    spec = {"max_model_len": 1024, "max_inflight_requests": MAX_INFLIGHT, "request_timeout_s": TIMEOUT_S}
    with router_with_fakes("pdserve-faults-test", spec, prefill=(2, (0.0, str(faults))),
                           decode=(2, (DECODE_S_PER_TOKEN, str(faults))),
                           router_options={"max_ongoing_requests": MAX_INFLIGHT + ROUTER_CONTROL_SLOTS}) as url:
        yield url  # the router's Serve cap as cluster.app sets it


def body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "The capital of France is", "max_tokens": max_tokens,
            "return_token_ids": True, **extra}


def complete(base_url: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/completions", json=body(max_tokens), timeout=60)


def stream_ids(base_url: str, max_tokens: int) -> tuple[list[int], list[dict[str, Any]]]:
    """Every token id the client got, in order, and the parsed events."""
    events = []
    request = body(max_tokens, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{base_url}/v1/completions", json=request, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    ids = [t for e in events for c in e.get("choices", []) for t in c.get("token_ids") or []]
    return ids, events


def decode_running(base_url: str) -> int:
    pools = httpx.get(f"{base_url}/dashboard/data", timeout=10).json()["pools"]
    return sum(r["running"] for r in pools.get("decode", []))


def wait_pool_whole(base_url: str, role: str, dead: str) -> None:
    """Until the router sees the pool at full size again, without the replica that died."""
    def whole() -> bool:
        rows = httpx.get(f"{base_url}/dashboard/data", timeout=10).json()["pools"][role]
        return len(rows) == 2 and all(not dead.endswith(r["replica"]) for r in rows)

    wait_until(whole, 60, f"Serve to replace the dead {role} replica")


def metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def expected(max_tokens: int) -> list[int]:
    return [42] + [43 + i for i in range(max_tokens - 1)]  # the fakes' uninterrupted answer


def test_a_prefill_replica_that_dies_mid_call_is_retried_on_another(base_url: str, faults: Path) -> None:
    assert complete(base_url, 2).status_code == 200  # both pools up
    (faults / "kill-prefill").touch()
    r = complete(base_url, 4)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == expected(4)
    assert r.json()["pdserve"]["prefill_retries"] == 1
    assert not (faults / "kill-prefill").exists()  # a replica took the cue and died
    assert metric(base_url, "pdserve_prefill_retries_total") >= 1
    # Serve replaces the dead replica; the pool is whole again and keeps serving.
    assert any(faults.glob("kill-prefill.taken-*"))  # taken by a replica's process, which then exited
    wait_until(lambda: len(httpx.get(f"{base_url}/dashboard/data").json()["pools"]["prefill"]) == 2, 60,
               "Serve to replace the dead prefill replica")
    assert all(complete(base_url, 2).status_code == 200 for _ in range(4))


def test_a_decode_replica_that_dies_mid_stream_is_resumed_without_lost_or_repeated_tokens(
    base_url: str, faults: Path
) -> None:
    (faults / "kill-decode").touch()
    ids, events = stream_ids(base_url, 12)
    assert ids == expected(12)  # the client's stream: every token once, in order
    assert not any("error" in e for e in events)
    assert not (faults / "kill-decode").exists()
    assert events[-1]["pdserve"]["decode_resumes"] == 1
    wait_pool_whole(base_url, "decode", events[-1]["pdserve"]["decode_replica"])
    (faults / "kill-decode").touch()
    r = complete(base_url, 10)  # and the same without streaming
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == expected(10)
    assert r.json()["pdserve"]["decode_resumes"] == 1
    assert metric(base_url, "pdserve_decode_resumes_total") >= 2
    wait_pool_whole(base_url, "decode", r.json()["pdserve"]["decode_replica"])  # whole for the next test


def test_past_its_in_flight_limit_the_router_answers_429_with_retry_after(base_url: str) -> None:
    async def run() -> tuple[list[int], httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            started = [asyncio.Event() for _ in range(MAX_INFLIGHT)]

            async def slow(started: asyncio.Event) -> int:
                """A stream of 30 tokens (~1.5 s): it holds its slot from its first chunk on."""
                async with client.stream("POST", f"{base_url}/v1/completions", json=body(30, stream=True)) as r:
                    async for _ in r.aiter_lines():
                        started.set()
                    return r.status_code

            slows = [asyncio.create_task(slow(s)) for s in started]
            # Every one admitted and streaming (a fixed wait was not always enough on a
            # loaded machine for all of them to have arrived).
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 30)
            over = await client.post(f"{base_url}/v1/completions", json=body(2))
            return [await t for t in slows], over

    before = metric(base_url, "pdserve_requests_rejected_total")
    admitted, over = asyncio.run(run())
    assert admitted == [200] * MAX_INFLIGHT  # the requests already in keep going
    assert over.status_code == 429 and over.headers["retry-after"] == "1"
    assert over.json()["error"]["type"] == "rate_limit_error" and over.json()["error"]["code"] == "too_many_requests"
    assert metric(base_url, "pdserve_requests_rejected_total") == before + 1
    assert complete(base_url, 2).status_code == 200  # the slots came back


def test_a_request_past_its_deadline_is_stopped_and_its_engine_stream_cancelled(base_url: str) -> None:
    t0 = time.monotonic()
    r = complete(base_url, 400)  # 400 tokens at 50 ms: 20 s, past the 8 s limit
    assert r.status_code == 503 and r.json()["error"]["code"] == "request_timeout", r.text
    assert TIMEOUT_S <= time.monotonic() - t0 < TIMEOUT_S + 2
    # Cancelled, not left to run: it had 12 s of tokens left.
    wait_until(lambda: decode_running(base_url) == 0, 3, "the decode engine to drop the stopped request")


def test_a_client_that_disconnects_has_its_engine_stream_cancelled(base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body(400, stream=True), timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 4:
                wait_until(lambda: decode_running(base_url) == 1, 5, "the stream to show on the decode engine")
                break  # leave mid-stream: the connection closes here
    # Cancelled, not left to run: the stream had ~19 s of tokens left.
    wait_until(lambda: decode_running(base_url) == 0, 3, "the decode engine to drop the abandoned stream")
    ids, _ = stream_ids(base_url, 5)  # and the next one is served as usual
    assert ids == expected(5)
