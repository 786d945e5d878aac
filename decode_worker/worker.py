"""Decode replica: gets prompt + first token, loads the prompt's KV from the store through
the connector (computing only the short tail), and streams the remaining tokens.

Two ways out for the tokens (``router.decode_stream``): ``decode_into`` sends them to the
asking router replica's token inbox, one message per engine step for all its requests there
(``kvstore.token_channel``), and answers how many it sent; ``decode`` streams them back as
the Serve call's own items, one Ray object each.

A Serve deployment class; the control plane wraps it with ``serve.deployment`` and its pool
options. vLLM is imported when the replica starts, never when this module is imported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import cached_property

from kvstore.engine_replica import EngineReplica
from kvstore.messages import EngineRequest
from kvstore.token_channel import InboxAddress, TokenOutbox


class DecodeWorker(EngineReplica):
    role = "decode"

    async def decode(self, payload: bytes, routing: bytes | None = None) -> AsyncIterator[bytes]:
        """Stream encoded EngineDeltas. Cancelling the stream aborts the engine request."""
        async for delta in self.host.generate(EngineRequest.decode(payload)):
            yield delta.encode()

    async def decode_into(self, payload: bytes, inbox: bytes, routing: bytes | None = None) -> int:
        """Send encoded EngineDeltas to the router's ``inbox``; the number sent. Cancelling the
        call aborts the engine request."""
        req = EngineRequest.decode(payload)
        deltas = (delta.encode() async for delta in self.host.generate(req))
        return await self.outbox.relay(InboxAddress.decode(inbox), req.request_id, deltas)

    @cached_property
    def outbox(self) -> TokenOutbox:
        return TokenOutbox()
