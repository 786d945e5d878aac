"""One request through the disaggregated path:

    1. prefill replica: prompt -> first token (max_tokens=1; its connector saves the KV)
    2. the first token goes to the client at once
    3. decode replica: prompt + first token -> the rest (its connector loads the KV)

A replica lost on the way (``router.faults.ReplicaLost``) costs the client nothing: a
prefill is retried on another replica (nothing was sent yet), and a decode stream that
breaks is resumed on another decode replica from the prompt plus every token already
streamed, so the client's stream goes on with no token repeated or missing. The resumed
decode loads the prompt's KV from the store and computes only the tokens it has not seen.
(Greedy output is unchanged by a resume; a seeded sampler restarts its random stream there,
and a stop string that straddles the resume point is not seen.)

Handle-agnostic: the router passes two callables, tests pass fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

from kvstore.logging import get_logger
from kvstore.messages import EngineDelta, EngineRequest, SamplingSpec, TokenLogprob
from router.faults import ReplicaLost
from router.policy import RoutingRequest

log = get_logger(__name__)

PrefillFn = Callable[[EngineRequest, RoutingRequest], Awaitable[EngineDelta]]
DecodeFn = Callable[[EngineRequest, RoutingRequest], AsyncIterator[EngineDelta]]


@dataclass
class Trace:
    """What the request did where; reported in the response's ``pdserve`` field."""

    prefill_replica: str = ""
    decode_replica: str = ""
    prefill_cached_tokens: int = 0
    decode_cached_tokens: int = 0
    prefill_node: str = ""  # where the prompt's KV was saved: decode prefers this node
    prefill_engine_s: float = 0.0  # of the time to first token, what the prefill engine took
    prefill_retries: int = 0  # prefill replicas lost under this request, each retried elsewhere
    decode_resumes: int = 0  # decode streams that broke and were resumed on another replica


@dataclass(frozen=True)
class Retries:
    """How hard one request tries past lost replicas (``router`` config)."""

    prefill_attempts: int = 3  # tries of the first token, each on whichever replica routing picks
    decode_resumes: int = 3  # times a broken decode stream is taken up by another replica
    backoff_s: float = 0.2  # before a retry, times the retry's number (Serve learns of the death)


@dataclass
class Generation:
    """Everything streamed so far, for the non-streaming response and the usage block."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    trace: Trace = field(default_factory=Trace)

    def add(self, delta: EngineDelta) -> None:
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


async def first_token(
    request_id: str,
    prompt: list[int],
    sampling: SamplingSpec,
    chunk_keys: tuple[bytes, ...],
    prefill: PrefillFn,
    trace: Trace,
    retries: Retries = Retries(),
) -> EngineDelta:
    """Step 1. The returned delta has ``finish_reason`` None when decoding must go on."""
    hint = RoutingRequest(request_id, "prefill", len(prompt), chunk_keys)
    for attempt in range(retries.prefill_attempts):
        req = EngineRequest(f"{request_id}-p{attempt or ''}", tuple(prompt), replace(sampling, max_tokens=1))
        try:
            first = await prefill(req, hint)
            break
        except ReplicaLost as e:
            if attempt + 1 >= retries.prefill_attempts:
                raise
            trace.prefill_retries += 1
            log.warning("request %s: %s; retrying the prefill (attempt %d)", request_id, e, attempt + 2)
            await asyncio.sleep(retries.backoff_s * (attempt + 1))
    trace.prefill_replica = first.replica
    trace.prefill_cached_tokens = first.num_cached_tokens
    trace.prefill_engine_s = round(first.engine_s, 6)
    # The prefill engine stops every request at one token ("length"); that is the split
    # point, not the end, unless the client asked for one token or the model stopped.
    if first.finish_reason == "length" and sampling.max_tokens > 1:
        first = replace(first, finish_reason=None)
    return first


async def rest(
    request_id: str,
    prompt: list[int],
    sampling: SamplingSpec,
    chunk_keys: tuple[bytes, ...],
    first: EngineDelta,
    decode: DecodeFn,
    trace: Trace,
    retries: Retries = Retries(),
) -> AsyncIterator[EngineDelta]:
    """Step 3: stream the tokens after the first one (resumed elsewhere if a replica is lost)."""
    if first.finish_reason is not None:
        return
    sent = list(first.token_ids)  # every token the client has, the first one included
    while True:
        ids = tuple(prompt) + tuple(sent)
        left = sampling.max_tokens - len(sent)
        req = EngineRequest(f"{request_id}-d{trace.decode_resumes or ''}", ids, replace(sampling, max_tokens=left))
        hint = RoutingRequest(request_id, "decode", len(ids), chunk_keys, prefer_node=trace.prefill_node)
        try:
            async for delta in decode(req, hint):
                if not trace.decode_replica:
                    trace.decode_replica = delta.replica
                    trace.decode_cached_tokens = delta.num_cached_tokens
                sent.extend(delta.token_ids)
                yield delta
            return
        except ReplicaLost as e:
            if trace.decode_resumes >= retries.decode_resumes:
                raise
            trace.decode_resumes += 1
            log.warning("request %s: %s after %d tokens; resuming the decode elsewhere", request_id, e, len(sent))
            await asyncio.sleep(retries.backoff_s * trace.decode_resumes)
