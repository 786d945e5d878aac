"""Prefill replica: computes the prompt's KV (loading any stored prefix first), saves every
full chunk to the store through the connector, and returns the first token.

A Serve deployment class; the control plane wraps it with ``serve.deployment`` and its pool
options. vLLM is imported when the replica starts, never when this module is imported.
"""

from __future__ import annotations

from dataclasses import replace

from kvstore.engine_replica import EngineReplica
from kvstore.messages import EngineDelta, EngineRequest


class PrefillWorker(EngineReplica):
    role = "prefill"

    async def prefill(self, payload: bytes, routing: bytes | None = None) -> bytes:
        """Run the prompt with max_tokens=1; returns the encoded first-token EngineDelta.

        ``routing`` carries the prompt's chunk keys for the request router; unused here.
        """
        request = EngineRequest.decode(payload)
        request = replace(request, sampling=replace(request.sampling, max_tokens=1))
        first: EngineDelta | None = None
        async for delta in self.host.generate(request):
            first = delta if first is None else _merge(first, delta)
        if first is None:
            raise RuntimeError(f"engine returned nothing for {request.request_id}")
        return first.encode()


def _merge(a: EngineDelta, b: EngineDelta) -> EngineDelta:
    """Fold a later delta into an earlier one (one token is usually one delta)."""
    logprobs = None
    if a.logprobs is not None or b.logprobs is not None:
        logprobs = (a.logprobs or ()) + (b.logprobs or ())
    return replace(
        b,
        token_ids=a.token_ids + b.token_ids,
        text=a.text + b.text,
        logprobs=logprobs,
        num_cached_tokens=max(a.num_cached_tokens, b.num_cached_tokens),
    )
