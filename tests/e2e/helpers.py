"""Helpers shared by the e2e modules: completions against a running cluster, the reference
check, and the store's counters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx

from kvstore.agent_rpc import AgentClient
from kvstore.metadata import MetadataStore, connect
from kvstore.peer_auth import PeerAuth
from router.tokenizer import PromptTokenizer
from tests.e2e.conftest import MAX_TOKENS, Cluster

MODEL = "SmolLM2-135M-Instruct"
CHUNK = 32
FP_TIE = 1e-3  # a divergence is accepted only where the reference's top-2 gap is below this


async def _complete(client: httpx.AsyncClient, base: str, prompt: str) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}
    r = await client.post(f"{base}/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return dict(r.json())


def complete_all(cluster: Cluster, prompts: list[str], concurrency: int = 4) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient() as client:
            async def one(p: str) -> dict[str, Any]:
                async with sem:
                    return await _complete(client, cluster.base_url, p)

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(run())


def assert_matches_reference(prompt: str, got: list[int], ref: dict[str, Any]) -> None:
    want = ref["token_ids"]
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            gap = ref["top2"][i][0] - ref["top2"][i][1]
            assert gap < FP_TIE, (f"diverged at token {i} ({a} vs {b}) with a top-2 gap of {gap:.5f}: "
                                  f"not floating-point order. prompt={prompt[:60]!r}")
            return  # a near-tie proven: after it the two continuations legitimately differ
    assert got == want, f"lengths differ for {prompt[:60]!r}: {len(got)} vs {len(want)}"


def store(cluster: Cluster) -> MetadataStore:
    return MetadataStore(connect(cluster.state().redis_url), "pdkv")


def empty_store(cluster: Cluster) -> None:
    """Every chunk gone: the metadata in Redis and the bytes in every agent's segment."""
    meta = store(cluster)
    meta.clear_chunks()
    for agent in meta.agents():
        AgentClient(agent.address, PeerAuth.for_store(cluster.state().redis_url, meta.prefix)).clear()


def distinct_long_prompts(tokenizer: PromptTokenizer, prompts: list[str], chunk: int) -> list[str]:
    """Prompts over three chunks long that share no first chunk: sent one at a time, none can
    reuse what another re-saves."""
    out: list[str] = []
    for p in prompts:
        ids = tokenizer.encode(p)
        if len(ids) > 3 * chunk and all(tokenizer.encode(q)[:chunk] != ids[:chunk] for q in out):
            out.append(p)
    return out


def role_counter(meta: MetadataStore, role: str, name: str) -> int:
    total = 0
    for key in meta.client.scan_iter(f"pdkv:stats:{role}-*"):
        total += int(meta.client.hget(key, name) or 0)
    return total


def n_tokens(tok: PromptTokenizer, prompt: str) -> int:
    return len(tok.encode(prompt))


def stream_through_a_fault(cluster: Cluster, prompt: str, fault: Callable[[], str], after_tokens: int = 16,
                           max_tokens: int = 160) -> str:
    """A long greedy completion run whole, then streamed with ``fault`` injected after
    ``after_tokens`` tokens (it returns what it broke). Asserts the stream goes on, is resumed
    exactly once, and equals the uninterrupted run token for token (a divergence allowed
    only at a floating-point near-tie). Returns what ``fault`` returned."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "logprobs": 2}
    whole = httpx.post(f"{cluster.base_url}/completions", json=body, timeout=300).json()
    want = whole["choices"][0]["token_ids"]
    gaps = [sorted(top.values(), reverse=True) for top in whole["choices"][0]["logprobs"]["top_logprobs"]]
    got: list[int] = []
    last: dict[str, Any] = {}
    broken = ""
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{cluster.base_url}/completions", json=stream_body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            last = event
            for choice in event["choices"]:
                got.extend(choice.get("token_ids") or [])
            if len(got) >= after_tokens and not broken:
                broken = fault()
    assert broken and last["pdserve"]["decode_resumes"] == 1, last
    assert len(got) == len(want) == max_tokens
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:  # only a floating-point near-tie may turn the two runs apart
            assert len(gaps[i]) == 2 and gaps[i][0] - gaps[i][1] < FP_TIE, (i, a, b, gaps[i])
            break
    return broken
