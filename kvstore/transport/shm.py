"""Same-node transport: the owning agent's segment mapped into the caller."""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.metadata import AgentInfo
from kvstore.segment import Segment, copy_into
from kvstore.transport.base import OnLanded, OnSlot, Transport, TransportError, slot_spans


class ShmTransport(Transport):
    name = "shm"

    def __init__(self) -> None:
        self._segments: dict[str, Segment] = {}

    def segment(self, name: str) -> Segment:
        seg = self._segments.get(name)
        if seg is None:
            try:
                seg = self._segments[name] = Segment.attach(name)
            except FileNotFoundError as e:
                raise TransportError(f"segment {name} is not on this node") from e
        return seg

    def read(
        self, peer: AgentInfo, offsets: Sequence[int], lengths: Sequence[int], on_slot: OnSlot,
        dest: memoryview | None = None, on_landed: OnLanded | None = None,
    ) -> None:
        buf = self._checked(peer, offsets, lengths)
        if dest is None:
            for i, (off, n) in enumerate(zip(offsets, lengths, strict=True)):
                on_slot(i, buf[off : off + n])
            return
        for i, (off, (a, b)) in enumerate(zip(offsets, slot_spans(lengths), strict=True)):
            copy_into(dest[a:b], buf[off : off + b - a])
            on_slot(i, dest[a:b])

    def write(self, peer: AgentInfo, offsets: Sequence[int], lengths: Sequence[int], src: memoryview) -> None:
        buf = self._checked(peer, offsets, lengths)
        for off, (a, b) in zip(offsets, slot_spans(lengths), strict=True):
            copy_into(buf[off : off + b - a], src[a:b])

    def _checked(self, peer: AgentInfo, offsets: Sequence[int], lengths: Sequence[int]) -> memoryview:
        buf = self.segment(peer.segment).buf
        for off, n in zip(offsets, lengths, strict=True):
            if off < 0 or off + n > len(buf):
                raise TransportError(f"slot {off}+{n} is outside segment {peer.segment}")
        return buf

    def close(self) -> None:
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
