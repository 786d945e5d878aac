"""The transport interface: how slot bytes move between a reader/writer and a segment.

A transport moves whole slots (64-byte header + payload) named by (segment, offset, length):
one-sided, the owning agent does no per-chunk bookkeeping beyond pinning the slots while
they are on the wire. Keys, checksums and metadata stay above this layer (``StoreClient``),
so every transport gets the same end-to-end check: a slot is trusted only if its header and
checksum match the location the reader looked up.

    shm   same node: the segment mapped into the caller (zero copy when reading views)
    tcp   other node: a raw socket to the agent's slot server, received with recv_into
          straight into the caller's buffer (no per-chunk Python objects, no framing copy)
    grpc  other node: a gRPC server stream of 1 MiB frames into the caller's buffer (works
          through anything that passes HTTP/2; about half the tcp transport's bandwidth)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

from kvstore.metadata import AgentInfo
from kvstore.segment import Segment

# on_slot(i, view): slot i's bytes (header + payload) are complete in ``view``, which is only
# valid during the call (it may point into a segment or a reused buffer).
OnSlot = Callable[[int, memoryview], None]
# on_landed(buf, n): the first n bytes of the read's landing buffer ``buf`` are in (called by
# network transports after each receive, so the reader can hash blocks while they are in cache).
OnLanded = Callable[[memoryview, int], None]


class TransportError(Exception):
    """The transfer failed (peer gone, refused, timed out); nothing after it was delivered."""


class SlotHost(Protocol):
    """What a transport's server side needs from the agent that owns the segment."""

    segment: Segment

    def open_read(self, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """Check the slots lie in the segment and pin them until ``close_read``."""

    def close_read(self, offsets: Sequence[int]) -> None: ...

    def open_write(self, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """Check each slot is allocated to a pending write and large enough."""

    def count_bytes(self, transport: str, direction: str, n: int) -> None: ...


class Transport(ABC):
    """Remote transports are constructed as ``cls(auth, timeout_s=...)``: every remote transport proves
    the cluster's store token to the agent it reaches (``kvstore.peer_auth``)."""

    name: ClassVar[str]
    _scratch = bytearray()  # replaced per instance on first growth (see _landing)

    @abstractmethod
    def read(
        self, peer: AgentInfo, offsets: Sequence[int], lengths: Sequence[int], on_slot: OnSlot,
        dest: memoryview | None = None, on_landed: OnLanded | None = None,
    ) -> None:
        """Deliver each slot to ``on_slot`` in order. With ``dest`` (at least the sum of
        ``lengths`` bytes) the slots also stay there back to back; without it the transport
        uses its own buffer (or, for shm, the segment itself). A transport that receives the
        slots piece by piece reports each piece to ``on_landed`` (shm, which has them all at
        once, does not)."""

    @abstractmethod
    def write(self, peer: AgentInfo, offsets: Sequence[int], lengths: Sequence[int], src: memoryview) -> None:
        """Write slots (already sealed, back to back in ``src``) into allocated slots."""

    def close(self) -> None:
        return None

    def _landing(self, dest: memoryview | None, total: int) -> memoryview:
        """Where a network read lands: the caller's buffer, or this transport's own (grown
        as needed and reused, so a steady load allocates nothing)."""
        if dest is not None:
            return dest
        if len(self._scratch) < total:
            self._scratch = bytearray(total)
        return memoryview(self._scratch)


def slot_spans(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each slot when the slots lie back to back in one buffer."""
    spans, pos = [], 0
    for n in lengths:
        spans.append((pos, pos + n))
        pos += n
    return spans
