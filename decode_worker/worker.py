"""Decode replica: gets prompt + first token, loads the prompt's KV from the store through
the connector (computing only the short tail), and streams the remaining tokens.

A Serve deployment class; the control plane wraps it with ``serve.deployment`` and its pool
options. vLLM is imported when the replica starts, never when this module is imported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from kvstore.engine_replica import EngineReplica
from kvstore.messages import EngineRequest


class DecodeWorker(EngineReplica):
    role = "decode"

    async def decode(self, payload: bytes, routing: bytes | None = None) -> AsyncIterator[bytes]:
        """Stream encoded EngineDeltas. Cancelling the stream aborts the engine request."""
        async for delta in self.host.generate(EngineRequest.decode(payload)):
            yield delta.encode()
