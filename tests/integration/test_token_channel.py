"""Decoded tokens to the router both ways (``router.decode_stream``), with Serve's calls on
either transport (``router.serve_transport``), through real Ray Serve and the real router,
with fake engines: many concurrent streams each get exactly their tokens in order; on the
token channel the decode replica's steps arrive batched (fewer messages than deltas), as the
router's own counters show; the HTTP proxy calls the router over gRPC exactly when the
transport says so."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .fakes import MODEL, router_with_fakes

STREAMS, TOKENS = 16, 20
STEP_S = 0.02  # the fake decode engine's step: every running sequence gets a token per step


# (decode_stream, serve_transport): the default, Serve's stream on gRPC, and the old path whole.
@pytest.fixture(scope="module", params=[("channel", "grpc"), ("serve", "grpc"), ("serve", "ray")],
                ids=["channel-grpc", "serve-grpc", "serve-ray"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    mode, transport = request.param
    with router_with_fakes(f"pdserve-channel-{mode}-{transport}", {"decode_stream": mode, "serve_transport": transport},
                           decode=(1, (STEP_S,)), router_options={"max_ongoing_requests": 64}) as url:
        # A first request warms the path (the handles, the inbox), so the measured streams overlap.
        assert asyncio.run(one_stream(url, -1)) == list(range(42, 42 + TOKENS))
        yield f"{mode}-{transport}", url


def channel_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {f.name: f.samples[0].value for f in text_string_to_metric_families(text)
            if f.name.startswith("pdserve_token_channel_")}


async def one_stream(url: str, i: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await stream(client, url, i)


async def stream(client: httpx.AsyncClient, url: str, i: int) -> list[int]:
    body = {"model": MODEL, "prompt": f"request number {i} says hello", "max_tokens": TOKENS, "stream": True,
            "return_token_ids": True}
    ids: list[int] = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
    return ids


def test_concurrent_streams_each_get_their_tokens_in_order(served: tuple[str, str]) -> None:
    mode, url = served
    before = channel_counters(url)

    async def main() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(stream(client, url, i) for i in range(STREAMS)))

    # The fake prefill answers 42, the fake decode 43, 44, ... after it: none lost, repeated
    # or taken from another request's stream.
    assert asyncio.run(main()) == [list(range(42, 42 + TOKENS))] * STREAMS
    after = channel_counters(url)
    delta = {name.removeprefix("pdserve_token_channel_").removesuffix("_total"): after[name] - before.get(name, 0)
             for name in after}
    if mode.startswith("serve"):
        assert delta == {"messages": 0, "deltas": 0, "dropped": 0, "rejected": 0}
        return
    assert delta["deltas"] == STREAMS * (TOKENS - 1)  # every decode delta came through the inbox
    assert delta["rejected"] == delta["dropped"] == 0
    # Each step's tokens of the running streams travel together: far fewer messages than
    # deltas (one per step if the streams ran in lockstep; arrivals are staggered a little).
    assert delta["messages"] <= delta["deltas"] / 2, delta


def test_the_http_proxy_calls_the_router_over_grpc_when_the_transport_says_so(served: tuple[str, str]) -> None:
    """Serve's proxies take their transport from their own environment, which they inherit from
    the controller (``cluster.app.controller_options``): the one place ``router.serve_transport``
    reaches them. The router's engine calls are set per handle (tests/unit/test_serve_transport.py)."""
    mode, _ = served
    proxies = [p for p in psutil.process_iter(["cmdline"]) if "ray::ProxyActor" in " ".join(p.info["cmdline"] or [])]
    assert proxies, "no Serve HTTP proxy process found"
    for proxy in proxies:
        grpc = proxy.environ().get("RAY_SERVE_USE_GRPC_BY_DEFAULT") == "1"
        assert grpc == mode.endswith("grpc"), (mode, proxy.pid)
