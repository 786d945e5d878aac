"""The Store Agent: one per node, owns that node's shared-memory segment.

It is the only process that allocates or frees slots and the only one that writes chunk
metadata to Redis, so the segment and Redis never disagree about who owns a slot. Engines on
the same node write and read slot payloads directly through the mapped segment; engines on
other nodes pull payloads through ``read`` (a one-sided read: the reader names the slot, the
agent does no bookkeeping for it).

Slot life cycle:

    allocate --> pending --commit--> committed --evict--> free
                    |                                     ^
                    +--------------abort------------------+

Eviction is oldest-committed-first when an allocation does not fit. Before a slot is reused
its header is invalidated, so a reader that raced the eviction sees a mismatch and recomputes.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from kvstore.allocator import OutOfSpace, SlotAllocator
from kvstore.logging import get_logger
from kvstore.metadata import AgentInfo, ChunkLocation, MetadataStore, connect
from kvstore.segment import HEADER_BYTES, SHM_DIR, Segment

log = get_logger(__name__)

SEGMENT_PREFIX = "pdkv-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphan_segments() -> list[str]:
    """Unlink segments whose owning agent died without closing them (killed actor, crash).

    Segment names carry the owner's pid: ``pdkv-<pid>-<id>``.
    """
    reaped = []
    for name in os.listdir(SHM_DIR):
        if not name.startswith(SEGMENT_PREFIX):
            continue
        pid_text = name[len(SEGMENT_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                reaped.append(name)
            except FileNotFoundError:
                pass
    if reaped:
        log.info("reaped %d orphaned store segments", len(reaped))
    return reaped


@dataclass(frozen=True)
class CommitEntry:
    key: bytes
    offset: int
    length: int  # payload bytes (the slot is HEADER_BYTES longer)
    crc32: int


@dataclass
class AgentStats:
    capacity: int
    used_bytes: int
    chunks: int
    pending: int
    allocated: int = 0
    committed: int = 0
    evicted: int = 0
    rejected: int = 0
    bytes_read_remote: int = 0


class StoreAgent:
    """Node-local store logic; the Ray actor and the gRPC service are thin shells around it."""

    def __init__(
        self, node_id: str, redis_url: str, capacity_bytes: int, prefix: str, address: str = ""
    ) -> None:
        self.node_id = node_id
        self.meta = MetadataStore(connect(redis_url, timeout_s=2.0), prefix)
        reap_orphan_segments()
        self.segment = Segment.create(f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}", capacity_bytes)
        self.alloc = SlotAllocator(capacity_bytes)
        self._lock = threading.Lock()
        self._pending: dict[int, float] = {}  # offset -> allocation time
        self._committed: OrderedDict[int, tuple[bytes, ChunkLocation]] = OrderedDict()
        self.stats = AgentStats(capacity=self.alloc.capacity, used_bytes=0, chunks=0, pending=0)
        self.address = address

    def info(self) -> AgentInfo:
        return AgentInfo(self.node_id, self.segment.name, self.alloc.capacity, self.address)

    def register(self) -> None:
        self.meta.register_agent(self.info())

    # -- slots ----------------------------------------------------------------------------

    def allocate(self, payload_lengths: list[int]) -> list[int]:
        """Offsets for as many of the requested payloads as fit, in order (prefix first)."""
        offsets: list[int] = []
        with self._lock:
            for length in payload_lengths:
                offset = self._allocate_one(HEADER_BYTES + length)
                if offset is None:
                    self.stats.rejected += len(payload_lengths) - len(offsets)
                    break
                self._pending[offset] = time.monotonic()
                offsets.append(offset)
            self.stats.allocated += len(offsets)
        return offsets

    def _allocate_one(self, slot_len: int) -> int | None:
        while True:
            try:
                return self.alloc.allocate(slot_len).offset
            except OutOfSpace:
                if not self._committed:
                    return None
                self._evict_oldest()

    def _evict_oldest(self) -> None:
        offset, (key, loc) = self._committed.popitem(last=False)
        try:
            self.meta.remove([(key, loc)])
        except Exception as e:  # Redis down: the header check below still protects readers
            log.warning("could not remove metadata of evicted chunk: %s", e)
        self.segment.invalidate(offset)
        self.alloc.free(offset)
        self.stats.evicted += 1

    def commit(self, entries: list[CommitEntry]) -> int:
        """Publish written slots in Redis; returns how many were committed."""
        with self._lock:
            valid = [e for e in entries if e.offset in self._pending]
            located = [
                (e.key, ChunkLocation(self.node_id, self.segment.name, e.offset, e.length, e.crc32))
                for e in valid
            ]
            try:
                self.meta.commit(located)
            except Exception:
                for e in valid:
                    self._release(e.offset)
                raise
            for (key, loc), e in zip(located, valid, strict=True):
                del self._pending[e.offset]
                self._committed[e.offset] = (key, loc)
            self.stats.committed += len(valid)
            return len(valid)

    def abort(self, offsets: list[int]) -> None:
        with self._lock:
            for offset in offsets:
                if offset in self._pending:
                    self._release(offset)

    def _release(self, offset: int) -> None:
        self._pending.pop(offset, None)
        self.segment.invalidate(offset)
        self.alloc.free(offset)

    def read(self, offset: int, slot_len: int) -> bytes:
        """Raw slot bytes (header + payload) for a reader on another node."""
        if offset < 0 or offset + slot_len > self.segment.size:
            raise ValueError(f"slot {offset}+{slot_len} is outside the segment")
        self.stats.bytes_read_remote += slot_len
        return bytes(self.segment.buf[offset : offset + slot_len])

    def clear(self) -> int:
        """Drop every committed chunk (metadata first, then bytes)."""
        with self._lock:
            n = len(self._committed)
            while self._committed:
                self._evict_oldest()
            return n

    def snapshot(self) -> AgentStats:
        with self._lock:
            self.stats.used_bytes = self.alloc.used_bytes
            self.stats.chunks = len(self._committed)
            self.stats.pending = len(self._pending)
            return AgentStats(**vars(self.stats))

    def close(self) -> None:
        try:
            self.meta.unregister_agent(self.node_id)
        except Exception as e:
            log.warning("could not unregister agent: %s", e)
        self.segment.close()
