"""One request through the disaggregated path:

    1. prefill replica: prompt -> first token (max_tokens=1; its connector saves the KV)
    2. the first token goes to the client at once
    3. decode replica: prompt + first token -> the rest (its connector loads the KV)

Handle-agnostic: the router passes two callables, tests pass fakes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

from kvstore.messages import EngineDelta, EngineRequest, SamplingSpec, TokenLogprob
from router.policy import RoutingRequest

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
) -> EngineDelta:
    """Step 1. The returned delta has ``finish_reason`` None when decoding must go on."""
    req = EngineRequest(f"{request_id}-p", tuple(prompt), replace(sampling, max_tokens=1))
    first = await prefill(req, RoutingRequest(request_id, "prefill", len(prompt), chunk_keys))
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
) -> AsyncIterator[EngineDelta]:
    """Step 3: stream the tokens after the first one."""
    if first.finish_reason is not None:
        return
    ids = tuple(prompt) + first.token_ids
    left = sampling.max_tokens - len(first.token_ids)
    req = EngineRequest(f"{request_id}-d", ids, replace(sampling, max_tokens=left))
    hint = RoutingRequest(request_id, "decode", len(ids), chunk_keys, prefer_node=trace.prefill_node)
    async for delta in decode(req, hint):
        if not trace.decode_replica:
            trace.decode_replica = delta.replica
            trace.decode_cached_tokens = delta.num_cached_tokens
        yield delta
