"""Cross-node transport over gRPC streams on the agent's gRPC server.

    ReadSlots   {offsets, lengths} (msgpack)  -> stream of frames (<= 1 MiB) of the slots'
                                                 bytes back to back
    WriteSlots  stream: {offsets, lengths} (msgpack), then frames of the slots' bytes -> {}

For deployments where only HTTP/2 passes between nodes. Every frame becomes a Python
``bytes`` on both ends (that is how gRPC Python hands messages over), so it is the slower of
the two network transports; the frames are still copied straight into the caller's buffer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import msgpack

from kvstore.metadata import AgentInfo
from kvstore.peer_auth import PeerAuth
from kvstore.transport.base import OnLanded, OnSlot, SlotHost, Transport, TransportError, slot_spans

SERVICE = "pdserve.StoreAgent"
FRAME_BYTES = 1 << 20  # the best frame size measured here (smaller: more per-message cost)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
]


def _frames(buf: memoryview, offsets: Sequence[int], lengths: Sequence[int]) -> Iterator[bytes]:
    for off, n in zip(offsets, lengths, strict=True):
        for a in range(off, off + n, FRAME_BYTES):
            yield bytes(buf[a : min(off + n, a + FRAME_BYTES)])


def handlers(host: SlotHost) -> dict[str, grpc.RpcMethodHandler]:
    """The agent-side methods, to be added to the agent's gRPC service."""

    def read_slots(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        m = msgpack.unpackb(request)
        offsets, lengths = list(m["offsets"]), list(m["lengths"])
        try:
            host.open_read(offsets, lengths)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            yield from _frames(host.segment.buf, offsets, lengths)
        finally:
            host.close_read(offsets)
        host.count_bytes("grpc", "out", sum(lengths))

    def write_slots(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        m = msgpack.unpackb(next(requests))
        offsets, lengths = list(m["offsets"]), list(m["lengths"])
        try:
            host.open_write(offsets, lengths)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        buf, spans = host.segment.buf, iter(zip(offsets, lengths, strict=True))
        off, left = next(spans)
        for frame in requests:
            view = memoryview(frame)
            while view:
                if left == 0:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "more bytes than the slots hold")
                take = min(left, len(view))
                buf[off : off + take] = view[:take]
                off, left, view = off + take, left - take, view[take:]
                if left == 0:
                    off, left = next(spans, (0, 0))
        host.count_bytes("grpc", "in", sum(lengths))
        return msgpack.packb({})

    return {
        "ReadSlots": grpc.unary_stream_rpc_method_handler(read_slots),
        "WriteSlots": grpc.stream_unary_rpc_method_handler(write_slots),
    }


class GrpcTransport(Transport):
    name = "grpc"

    def __init__(self, auth: PeerAuth, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self._auth = auth
        self._metadata = self._auth.call_metadata()
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, address: str) -> grpc.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = self._auth.channel(address, CHANNEL_OPTIONS)
        return ch

    def read(
        self, peer: AgentInfo, offsets: Sequence[int], lengths: Sequence[int], on_slot: OnSlot,
        dest: memoryview | None = None, on_landed: OnLanded | None = None,
    ) -> None:
        if not offsets:
            return
        total = sum(lengths)
        dest = self._landing(dest, total)
        stub = self._channel(peer.address).unary_stream(f"/{SERVICE}/ReadSlots")
        body = msgpack.packb({"offsets": list(offsets), "lengths": list(lengths)})
        spans = slot_spans(lengths)
        slot, pos = 0, 0
        try:
            for frame in stub(body, timeout=self.timeout_s, metadata=self._metadata):
                dest[pos : pos + len(frame)] = frame
                pos += len(frame)
                if on_landed is not None:
                    on_landed(dest, pos)
                while slot < len(spans) and spans[slot][1] <= pos:
                    a, b = spans[slot]
                    on_slot(slot, dest[a:b])
                    slot += 1
        except grpc.RpcError as e:
            raise TransportError(f"read from {peer.address}: {e.code().name}: {e.details()}") from e
        if slot != len(spans):
            raise TransportError(f"read from {peer.address} ended after {pos} of {total} bytes")

    def write(self, peer: AgentInfo, offsets: Sequence[int], lengths: Sequence[int], src: memoryview) -> None:
        if not offsets:
            return
        total = sum(lengths)

        def stream() -> Iterator[Any]:
            yield msgpack.packb({"offsets": list(offsets), "lengths": list(lengths)})
            for a in range(0, total, FRAME_BYTES):
                yield bytes(src[a : min(total, a + FRAME_BYTES)])

        stub = self._channel(peer.address).stream_unary(f"/{SERVICE}/WriteSlots")
        try:
            stub(stream(), timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise TransportError(f"write to {peer.address}: {e.code().name}: {e.details()}") from e

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
