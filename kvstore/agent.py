"""The Store Agent: one per node, owns that node's shared-memory segment.

It is the only process that allocates or frees slots and the only one that writes chunk
metadata to Redis, so the segment and Redis never disagree about who owns a slot. Engines on
the same node write and read slot payloads directly through the mapped segment; engines on
other nodes move slots through a transport (``kvstore.transport``), one-sided: they name the
slot, the agent only pins it while it is on the wire.

Slot life cycle:

    allocate --> pending --commit--> committed --evict / expire--> free
                    |                   ^  |                       ^
                    +--abort/timeout----|--|-----------------------+
                                        readers pin (eviction skips pinned slots)

Readers on this node pin a slot with a shared byte-range lock on the segment file and stamp
its header when they read it; remote reads are pinned here while they are on the wire. The
agent evicts a slot only under the exclusive lock, choosing least-recently-used first with a
CLOCK-style second chance: a slot whose header stamp is newer than what the agent last saw
goes to the back of the queue. Idle chunks expire after ``ttl_s`` (0 = never). Before a slot
is reused its header is invalidated, so a reader holding an old location sees a mismatch.

The agent also keeps Redis honest: it heartbeats a liveness key, re-publishes everything it
holds when Redis forgot it (restart, or its chunks were reaped while it was unreachable), and
drops the chunks of agents whose liveness expired (a node that left the cluster).
"""

from __future__ import annotations

import operator
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.allocator import OutOfSpace, SlotAllocator
from kvstore.logging import get_logger
from kvstore.metadata import AgentInfo, ChunkLocation, MetadataStore, connect
from kvstore.segment import HEADER_BYTES, SHM_DIR, Segment

log = get_logger(__name__)

SEGMENT_PREFIX = "pdkv-"
Located = tuple[bytes, ChunkLocation]  # a chunk key and where its committed copy lives


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
    checksum: int


@dataclass(frozen=True)
class AgentSettings:
    ttl_s: float = 0.0  # idle chunks expire after this long; 0 = only evicted under pressure
    lease_s: float = 10.0  # a remote read's pin lapses after this long (a stuck transfer)
    pending_timeout_s: float = 60.0  # slots of a writer that never committed are reclaimed
    alive_ttl_ms: int = 5000  # liveness key lifetime; other agents reap this node after it


@dataclass
class AgentStats:
    capacity: int = 0
    used_bytes: int = 0
    chunks: int = 0
    pending: int = 0
    pinned: int = 0
    allocated: int = 0
    committed: int = 0
    evicted: int = 0
    expired: int = 0
    rejected: int = 0
    remote_reads: int = 0
    replicas: int = 0  # replicas of other nodes' chunks committed here (hot-chunk replication)
    reclaimed_pending: int = 0
    republished: int = 0
    reaped_nodes: int = 0
    bytes_out_tcp: int = 0
    bytes_out_grpc: int = 0
    bytes_in_tcp: int = 0
    bytes_in_grpc: int = 0


@dataclass
class _Chunk:
    key: bytes
    loc: ChunkLocation
    touched_ns: int  # last use the agent knows of (commit, remote read, a reader's stamp)
    replica: bool = False  # a replica of a chunk committed on another node (metadata.commit)

    @property
    def slot_len(self) -> int:
        return HEADER_BYTES + self.loc.length


class StoreAgent:
    """Node-local store logic; the Ray actor and the servers are thin shells around it."""

    def __init__(
        self, node_id: str, redis_url: str, capacity_bytes: int, prefix: str, address: str = "",
        settings: AgentSettings | None = None,
    ) -> None:
        self.node_id = node_id
        self.settings = settings or AgentSettings()
        self.meta = MetadataStore(connect(redis_url, timeout_s=2.0), prefix)
        reap_orphan_segments()
        self.segment = Segment.create(f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}", capacity_bytes)
        self.alloc = SlotAllocator(capacity_bytes)
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[float, int]] = {}  # offset -> (allocated at, slot bytes)
        self._committed: OrderedDict[int, _Chunk] = OrderedDict()  # LRU order, oldest first
        self._pins: dict[int, list[float]] = {}  # offset -> expiry of each lease on it
        self.stats = AgentStats(capacity=self.alloc.capacity)
        self.address = address
        self.data_address = ""
        self._ticks = 0
        try:  # a previous agent of this node (crashed, restarted) left locations behind
            self.meta.drop_node(node_id, keep_segment=self.segment.name)
        except Exception as e:
            log.warning("could not drop the previous agent's chunks: %s", e)

    def info(self) -> AgentInfo:
        return AgentInfo(self.node_id, self.segment.name, self.alloc.capacity, self.address, self.data_address)

    # -- slots ----------------------------------------------------------------------------

    def allocate(self, payload_lengths: list[int]) -> list[int]:
        """Offsets for as many of the requested payloads as fit, in order (prefix first).
        Makes room by evicting least-recently-used unpinned chunks."""
        offsets: list[int] = []
        victims: list[tuple[bytes, ChunkLocation]] = []
        with self._lock:
            now = time.monotonic()
            for length in payload_lengths:
                offset = self._allocate_one(HEADER_BYTES + length, now, victims)
                if offset is None:
                    self.stats.rejected += len(payload_lengths) - len(offsets)
                    break
                self._pending[offset] = (now, HEADER_BYTES + length)
                offsets.append(offset)
            self.stats.allocated += len(offsets)
            self._forget(victims)  # before the caller writes a byte into a reused slot
        return offsets

    def _allocate_one(self, slot_len: int, now: float, victims: list[tuple[bytes, ChunkLocation]]) -> int | None:
        while True:
            try:
                return self.alloc.allocate(slot_len).offset
            except OutOfSpace:
                victim = self._evict_lru(now)
                if victim is None:
                    return None
                victims.append(victim)
                self.stats.evicted += 1

    def _evict_lru(self, now: float) -> tuple[bytes, ChunkLocation] | None:
        """Evict the least recently used unpinned chunk (CLOCK-style: a chunk read since the
        agent last looked gets a second chance at the back of the queue)."""
        for _ in range(len(self._committed)):
            offset, chunk = next(iter(self._committed.items()))
            stamp = self.segment.touched_ns(offset)
            if stamp > chunk.touched_ns:
                chunk.touched_ns = stamp
                self._committed.move_to_end(offset)
                continue
            victim = self._try_evict(offset, now)
            if victim is not None:
                return victim
            self._committed.move_to_end(offset)  # pinned: look at the others first
        return None

    def _try_evict(self, offset: int, now: float) -> tuple[bytes, ChunkLocation] | None:
        """Evict the chunk at ``offset`` unless a reader holds it."""
        if self._pinned(offset, now):
            return None
        n = self._committed[offset].slot_len
        if not self.segment.locks.try_exclusive(offset, n):
            return None
        try:
            return self._evict(offset)
        finally:
            self.segment.locks.unlock(offset, n)

    def _evict(self, offset: int) -> tuple[bytes, ChunkLocation]:
        chunk = self._committed.pop(offset)
        self.segment.invalidate(offset)
        self.alloc.free(offset)
        return chunk.key, chunk.loc

    def _forget(self, removed: list[tuple[bytes, ChunkLocation]], counter: str = "evicted") -> None:
        if not removed:
            return
        try:
            self.meta.remove(removed, counter=counter)
        except Exception as e:  # Redis down: the header check still protects readers
            log.warning("could not remove metadata of %d dropped chunks: %s", len(removed), e)

    def commit(self, entries: list[CommitEntry], replica: bool = False) -> int:
        """Publish written slots in Redis (as this node's replicas of chunks committed
        elsewhere, with ``replica``); returns how many were committed."""
        with self._lock:
            valid = [e for e in entries if e.offset in self._pending]
            located = [
                (e.key, ChunkLocation(self.node_id, self.segment.name, e.offset, e.length, e.checksum))
                for e in valid
            ]
            try:
                self.meta.commit(located, replica=replica)
            except Exception:
                for e in valid:
                    self._release(e.offset)
                raise
            now_ns = time.monotonic_ns()
            for (key, loc), e in zip(located, valid, strict=True):
                del self._pending[e.offset]
                self._committed[e.offset] = _Chunk(key, loc, now_ns, replica)
            self.stats.committed += len(valid)
            self.stats.replicas += len(valid) if replica else 0
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

    # -- pins ---------------------------------------------------------------------------

    def _pinned(self, offset: int, now: float) -> bool:
        """Whether a remote read through this agent holds the slot (same-node readers pin
        with file locks instead: see ``_try_evict``)."""
        expiries = self._pins.get(offset)
        if not expiries:
            return False
        live = [t for t in expiries if t > now]
        if live:
            self._pins[offset] = live
            return True
        del self._pins[offset]
        return False

    def _unpin(self, offset: int) -> None:
        expiries = self._pins.get(offset)
        if expiries:
            expiries.pop(0)
            if not expiries:
                del self._pins[offset]

    def discard(self, slots: Sequence[tuple[int, bytes]]) -> int:
        """Drop chunks a reader found damaged (checksum mismatch), so no one reads them again
        and the next save stores a good copy. Only a slot still holding that key is touched;
        one that another reader holds right now loses its metadata at once and its bytes at
        its next eviction."""
        with self._lock:
            offsets = [off for off, key in slots if (c := self._committed.get(off)) is not None and c.key == key]
            dropped, busy = self._drop(offsets)
            self._forget(dropped + busy, counter="discarded")
            return len(dropped) + len(busy)

    def _drop(self, offsets: Sequence[int]) -> tuple[list[Located], list[Located]]:
        """Evict each committed chunk no reader holds; the held ones are returned apart (their
        metadata can go now, their bytes at a later eviction). Caller holds the lock."""
        now = time.monotonic()
        dropped, busy = [], []
        for offset in offsets:
            chunk = self._committed[offset]
            victim = self._try_evict(offset, now)
            if victim is not None:
                dropped.append(victim)
            else:
                busy.append((chunk.key, chunk.loc))
        return dropped, busy

    # -- the transports' server side (SlotHost) -------------------------------------------

    def _check_range(self, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        if len(offsets) != len(lengths):
            raise ValueError("offsets and lengths differ in count")
        if not offsets:
            return
        # Whole-column checks (C loops): a remote read of 64 KiB chunks asks for a thousand
        # slots, and this runs before its first byte goes out. The loop only names the culprit.
        if min(offsets) >= 0 and min(lengths) > 0 and max(map(operator.add, offsets, lengths)) <= self.segment.size:
            return
        for off, n in zip(offsets, lengths, strict=True):
            if off < 0 or n <= 0 or off + n > self.segment.size:
                raise ValueError(f"slot {off}+{n} is outside the segment")

    def open_read(self, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """Pin the slots for a remote read. Only the pins come before the first byte is sent;
        the reads count as uses for the LRU when they end (``close_read``)."""
        self._check_range(offsets, lengths)
        expiry = time.monotonic() + self.settings.lease_s
        with self._lock:
            pins = self._pins
            for off in offsets:
                held = pins.get(off)
                if held is None:
                    pins[off] = [expiry]
                else:
                    held.append(expiry)
            self.stats.remote_reads += len(offsets)

    def close_read(self, offsets: Sequence[int]) -> None:
        now_ns = time.monotonic_ns()
        with self._lock:
            committed = self._committed
            for offset in offsets:
                self._unpin(offset)
                chunk = committed.get(offset)
                if chunk is not None:  # a use, for the LRU
                    chunk.touched_ns = now_ns
                    committed.move_to_end(offset)

    def open_write(self, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        self._check_range(offsets, lengths)
        with self._lock:
            for off, n in zip(offsets, lengths, strict=True):
                pending = self._pending.get(off)
                if pending is None or n > pending[1]:
                    raise ValueError(f"slot {off}+{n} is not allocated to a pending write")

    def count_bytes(self, transport: str, direction: str, n: int) -> None:
        name = f"bytes_{direction}_{transport}"
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    # -- upkeep ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Heartbeat and housekeeping; the actor calls it every second. Raises if Redis is
        unreachable (the caller retries on the next tick)."""
        self._ticks += 1
        if not self.meta.heartbeat(self.info(), self.settings.alive_ttl_ms):
            self._republish()
        now = time.monotonic()
        self._expire_idle(now)
        self._reclaim_pending(now)
        if self._ticks % 5 == 1:
            reap_orphan_segments()  # of agents on this host that died without cleaning up
            reaped = self.meta.reap_dead_nodes()
            if reaped:
                log.warning("dropped the chunks of departed store nodes: %s", reaped)
                with self._lock:
                    self.stats.reaped_nodes += len(reaped)

    def _republish(self) -> None:
        with self._lock:
            entries = [(c.key, c.loc, c.replica) for c in self._committed.values()]
        for replica in (False, True):
            kind = [(k, loc) for k, loc, r in entries if r == replica]
            for i in range(0, len(kind), 1000):
                self.meta.commit(kind[i : i + 1000], replica=replica)
        if entries:
            log.warning("re-published %d chunks to a Redis that had lost them", len(entries))
        with self._lock:
            self.stats.republished += len(entries)

    def _expire_idle(self, now: float) -> None:
        if self.settings.ttl_s <= 0:
            return
        cutoff = time.monotonic_ns() - int(self.settings.ttl_s * 1e9)
        expired = []
        with self._lock:
            for offset, chunk in list(self._committed.items()):
                chunk.touched_ns = max(chunk.touched_ns, self.segment.touched_ns(offset))
                if chunk.touched_ns <= cutoff and (victim := self._try_evict(offset, now)) is not None:
                    expired.append(victim)
            self.stats.expired += len(expired)
            self._forget(expired, counter="expired")

    def _reclaim_pending(self, now: float) -> None:
        with self._lock:
            stale = [off for off, (t, _) in self._pending.items() if now - t > self.settings.pending_timeout_s]
            for off in stale:
                self._release(off)
            self.stats.reclaimed_pending += len(stale)

    def clear(self) -> int:
        """Drop every chunk no reader holds; the metadata of all of them."""
        with self._lock:
            dropped, busy = self._drop(list(self._committed))
            self._forget(dropped + busy)
            self.stats.evicted += len(dropped)
            return len(dropped) + len(busy)

    def snapshot(self) -> AgentStats:
        with self._lock:
            self.stats.used_bytes = self.alloc.used_bytes
            self.stats.chunks = len(self._committed)
            self.stats.pending = len(self._pending)
            self.stats.pinned = len(self._pins)
            return AgentStats(**vars(self.stats))

    def close(self) -> None:
        try:
            self.meta.drop_node(self.node_id)
            self.meta.unregister_agent(self.node_id)
        except Exception as e:
            log.warning("could not unregister agent: %s", e)
        self.segment.close()
