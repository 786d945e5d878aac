"""Load generator for any OpenAI-compatible server: seeded prompts, streamed completions,
a closed loop of C concurrent clients, per-token timestamps.

Prompts are sent as token-id lists, not text: both pdserve and vLLM's server accept
``prompt: [int, ...]``, and ids give every system exactly the same prompt length (text would
be re-tokenized, and a decode/encode round trip does not preserve length).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.stats import RequestResult

# Ordinary lower-case words with a leading space: random sequences of them read like (bad)
# prose, tokenize stably, and avoid special/control tokens that could end generation early.
_WORDLIKE = re.compile(r"^ [a-z]{3,}$")


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    max_tokens: int


def wordlike_vocab(model_dir: str | Path) -> list[int]:
    """Token ids of the checkpoint's ordinary words (the tokenizer is torch-free)."""
    from router.tokenizer import PromptTokenizer

    tok = PromptTokenizer(model_dir)
    ids = [i for i in range(tok.vocab_size) if _WORDLIKE.match(tok.decode_token(i))]
    if len(ids) < 100:
        raise RuntimeError(f"only {len(ids)} word-like tokens in {model_dir}; wrong tokenizer?")
    return ids


def build_prompts(vocab: Sequence[int], n: int, input_len: int, output_len: int, seed: int,
                  jitter: float = 0.25) -> list[Prompt]:
    """``n`` prompts of input_len * U[1 - jitter, 1 + jitter] tokens, fixed by ``seed``.

    Every prompt draws its own random tokens, so prompts share no prefix and vLLM's prefix
    cache (on in both systems) cannot turn the benchmark into a cache-hit test.
    """
    rng = random.Random(seed)
    lo = max(1, round(input_len * (1 - jitter)))
    hi = max(lo, round(input_len * (1 + jitter)))
    return [Prompt([rng.choice(vocab) for _ in range(rng.randint(lo, hi))], output_len)
            for _ in range(n)]


def request_body(model: str, prompt: Prompt) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt.token_ids,
        "max_tokens": prompt.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,  # equal output lengths, so TPOT/e2e compare like with like
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }


def _chunk_tokens(choice: dict[str, Any]) -> int:
    """Output tokens in one streamed choice: its token_ids, else 1 if it carries any text.

    The fallback under-counts when a server packs several tokens into one chunk without
    ids; compare.py flags that case by checking against the usage chunk.
    """
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    return 1 if choice.get("text") else 0


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                     timeout_s: float) -> RequestResult:
    """POST one streamed completion; time every token-carrying chunk from the send."""
    res = RequestResult(prompt_tokens=len(body["prompt"]))
    t0 = res.sent_at = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                res.ok = False
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:500]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - t0
                event = json.loads(data)
                if "error" in event:  # an in-band error after the headers went out
                    res.ok = False
                    res.error = json.dumps(event["error"])[:500]
                    continue
                if event.get("usage"):
                    res.usage_completion_tokens = event["usage"].get("completion_tokens")
                if event.get("pdserve"):
                    res.trace = event["pdserve"]
                for c in event.get("choices") or []:
                    res.output_ids += c.get("token_ids") or []
                n = sum(_chunk_tokens(c) for c in event.get("choices") or [])
                if n:
                    res.token_events.append((now, n))
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.ok = False
        res.error = f"{type(e).__name__}: {e}"
    res.e2e_s = time.perf_counter() - t0
    if res.ok and res.n_out == 0:
        res.ok, res.error = False, "the stream carried no output tokens"
    return res


async def run_load(base_url: str, model: str, prompts: Sequence[Prompt], concurrency: int,
                   timeout_s: float = 600.0) -> tuple[list[RequestResult], float]:
    """Closed loop: ``concurrency`` workers take prompts in order until none are left.

    Returns results in prompt order and the wall time from the first send to the last
    response, the denominator of output tok/s.
    """
    url = base_url.rstrip("/") + "/completions"
    results: list[RequestResult | None] = [None] * len(prompts)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    # One connection per worker, no pool starvation; no read timeout inside a stream other
    # than the per-request one (a decode stall of seconds is data, not an error).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results[i] = await stream_one(client, url, request_body(model, prompts[i]), timeout_s)

    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(max(1, concurrency))))
        wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall
