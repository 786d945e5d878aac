"""The device tier: chunks a prefill engine saved, kept in its GPU memory and pulled from there
by the other engines of its node through CUDA IPC (issue 12, item 2).

The host segment stays the store: every chunk is still saved there (``StoreClient``). The tier
is a faster second copy of the most recently saved chunks, a ring of equal slots in one CUDA
allocation per prefill engine process (``kvstore.gpu_tier_mb``)::

    owner (prefill engine)                   Redis                          reader (decode engine, same node)
    save: gather -> staging --D2H--> segment  {prefix}:dtier:<owner>         MGET dt:<key> of the request's chunks
                       `--D2D--> tier slots    node, pid, GPU, slot bytes,    keep: this node, checksum == loc's
          SET dt:<key> = [owner, node,         n slots, IPC handle (TTL)      open the owner's buffer (once, cached)
              slot, checksum] (TTL);          {prefix}:dt:<key>               slot --D2D--> staging --xxh3 on the GPU
          delete the mappings of the keys      [owner, node, slot, checksum]  --> compare --> scatter the matches
          whose slots the ring reused                                         the rest: the host path, as before

A slot's life (``SlotRing``)::

    free --take--> staged (copy queued) --publish--> bound (key, mapping) --take--> evicted
                      `--abandon (the save failed)--> unbound                        (its mapping deleted if
                                                                                      unchanged, at the next publish)

A mapping is a hint, never trusted: the reader hashes its own copy on its GPU and keeps only
the chunks whose digest equals the checksum of the location it looked up. A slot the owner
reused in between, an owner that restarted (a new owner id; a changed record is reopened) or is
gone (no record), a handle that does not open here: each only sends that chunk down the host
path, which verifies it again; a chunk neither path delivers is recomputed.

CUDA-only in use (the connector imports this module only for engines whose KV cache is on a CUDA
device), but it imports nothing GPU-only: the ring, the records and the reader's choice run on
CPU with fakes in ``tests/unit/test_device_tier.py``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from kvstore.logging import get_logger
from kvstore.metadata import ChunkLocation, MetadataStore, replace_if_unchanged, tier_mapping_name, tier_owner_name

log = get_logger(__name__)

RECORD_TTL_S = 60  # an owner record lapses this long after its owner stopped renewing it (died)
RECORD_REFRESH_S = 15  # how often a live owner renews it (a thread), and a save when it is older
MAPPING_TTL_S = 600  # longer is useless: the ring reuses a slot long before on a busy engine


@dataclass(frozen=True)
class TierMapping:
    """Where a chunk's tier copy is (``{prefix}:dt:<key>``)."""

    owner: str
    node_id: str
    slot: int
    checksum: int  # segment.checksum of the chunk's bytes: the one sealed in its host slot

    def encode(self) -> bytes:  # fields by hand: astuple deep-copies, and a save encodes one per chunk
        return bytes(msgpack.packb([self.owner, self.node_id, self.slot, self.checksum]))

    @classmethod
    def decode(cls, raw: bytes) -> TierMapping:
        owner, node_id, slot, checksum = msgpack.unpackb(raw)
        return cls(str(owner), str(node_id), int(slot), int(checksum))


@dataclass(frozen=True)
class OwnerRecord:
    """A device tier's buffer, for its readers (``{prefix}:dtier:<owner>``). ``handle`` is
    torch's ``UntypedStorage._share_cuda_()``: (device index, IPC memory handle, storage bytes,
    storage offset, ref-counter file, its offset, IPC event handle, whether to wait on it)."""

    owner: str
    node_id: str
    pid: int
    device_uuid: str
    slot_bytes: int
    n_slots: int
    handle: tuple[Any, ...]

    def encode(self) -> bytes:
        fields = [self.owner, self.node_id, self.pid, self.device_uuid, self.slot_bytes, self.n_slots,
                  list(self.handle)]
        return bytes(msgpack.packb(fields))

    @classmethod
    def decode(cls, raw: bytes) -> OwnerRecord:
        owner, node_id, pid, device_uuid, slot_bytes, n_slots, handle = msgpack.unpackb(raw)
        return cls(str(owner), str(node_id), int(pid), str(device_uuid), int(slot_bytes), int(n_slots),
                   tuple(handle))


class SlotRing:
    """Ring allocation of a tier's slots. It remembers the (key, mapping) each bound slot holds,
    so that reusing the slot names the mapping to delete."""

    def __init__(self, n_slots: int) -> None:
        if n_slots < 1:
            raise ValueError("a device tier needs at least one slot")
        self.n_slots = n_slots
        self._next = 0
        self._held: list[tuple[bytes, bytes] | None] = [None] * n_slots

    def take(self, n: int) -> tuple[list[int], list[tuple[bytes, bytes]]]:
        """The next ``min(n, n_slots)`` slots (the oldest copies go first) and the (key,
        mapping) of each that was bound."""
        slots = [(self._next + i) % self.n_slots for i in range(min(max(n, 0), self.n_slots))]
        self._next = (self._next + len(slots)) % self.n_slots
        evicted = []
        for s in slots:
            held, self._held[s] = self._held[s], None
            if held is not None:
                evicted.append(held)
        return slots, evicted

    def bind(self, slot: int, key: bytes, mapping: bytes) -> None:
        self._held[slot] = (key, mapping)

    def bound(self) -> list[tuple[bytes, bytes]]:
        return [h for h in self._held if h is not None]


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first slot, its index in ``slots``, count) of each run of consecutive slots: one copy
    each (a ring's take is one run, or two where it wraps)."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if runs and runs[-1][0] + runs[-1][2] == s:
            first, at, count = runs[-1]
            runs[-1] = (first, at, count + 1)
        else:
            runs.append((s, i, 1))
    return runs


class DeviceTier:
    """The owner side, in a prefill engine's worker: ``n_slots`` slots of ``slot_bytes`` (the
    engine's chunk size) in one GPU buffer. Per save, ``stage`` queues the copies of a staging
    group into slots (GpuKVPath.extract_many_staged calls it), and ``publish`` names them once
    the copies are done; ``abandon`` forgets a failed save's staged slots."""

    def __init__(self, meta: MetadataStore, node_id: str, buffer: torch.Tensor, slot_bytes: int,
                 handle: Sequence[Any], device_uuid: str) -> None:
        self.meta = meta
        self.node_id = node_id
        self.buffer = buffer
        self.slot_bytes = slot_bytes
        self.ring = SlotRing(buffer.numel() // slot_bytes)
        self.owner = f"{node_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # new with every process
        self.record = OwnerRecord(self.owner, node_id, os.getpid(), device_uuid, slot_bytes, self.ring.n_slots,
                                  tuple(handle))
        self._record_raw = self.record.encode()
        self._record_at = float("-inf")  # set with the first publish: no Redis call at start
        self._staged: list[int] = []  # slots of this save's chunks, in chunk order
        self._evicted: list[tuple[bytes, bytes]] = []  # (key, mapping) whose slot was reused
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @classmethod
    def allocate(cls, meta: MetadataStore, node_id: str, device: torch.device, slot_bytes: int,
                 budget_bytes: int) -> DeviceTier:
        n_slots = budget_bytes // slot_bytes
        if n_slots < 1:
            raise ValueError(f"a device tier of {budget_bytes >> 20} MiB holds no {slot_bytes} B chunk")
        buffer = torch.empty(n_slots * slot_bytes, dtype=torch.uint8, device=device)
        props = torch.cuda.get_device_properties(device)
        tier = cls(meta, node_id, buffer, slot_bytes, export_handle(buffer), str(getattr(props, "uuid", "")))
        tier._renewer = threading.Thread(target=tier._renew, name="pdkv-device-tier", daemon=True)
        tier._renewer.start()
        log.info("device tier %s: %d slots of %d B on %s", tier.owner, n_slots, slot_bytes, device)
        return tier

    def _renew(self) -> None:
        """Keep the owner record alive while this process lives, saving or idle: readers take a
        missing record for a dead owner."""
        name = tier_owner_name(self.meta.prefix, self.owner)
        while True:
            try:
                self.meta.client.set(name, self._record_raw, ex=RECORD_TTL_S)
            except Exception as e:  # Redis away: the next beat (or save) tries again
                log.debug("device tier record not renewed: %s", e)
            if self._stop.wait(RECORD_REFRESH_S):
                return

    def stage(self, flat: torch.Tensor, n_chunks: int, chunk_bytes: int) -> None:
        """Queue, on the current stream, the copies of the first chunks in ``flat`` (``n_chunks``
        of ``chunk_bytes``, back to back) into the next slots; a save stages at most one ring."""
        if chunk_bytes != self.slot_bytes:
            return
        slots, evicted = self.ring.take(min(n_chunks, self.ring.n_slots - len(self._staged)))
        self._evicted += evicted
        sb = self.slot_bytes
        for first, at, count in slot_runs(slots):
            self.buffer[first * sb : (first + count) * sb].copy_(flat[at * sb : (at + count) * sb], non_blocking=True)
        self._staged += slots

    def publish(self, keys: Sequence[bytes], checksums: Sequence[int | None]) -> int:
        """Name the staged slots (their copies done) as the copies of ``keys``, the save's chunks
        in order (those past the staged ones are not in the tier); delete the mappings of the
        keys whose slots were reused; refresh the owner record. One round trip, one command
        for all the mappings; returns how many chunks of this save the tier holds."""
        staged, self._staged = self._staged, []
        evicted, self._evicted = self._evicted, []
        prefix = self.meta.prefix
        sets = []
        for slot, key, checksum in zip(staged, keys, checksums, strict=False):
            if checksum is None:  # no GPU checksum: a reader could not verify the copy
                continue
            raw = TierMapping(self.owner, self.node_id, slot, checksum).encode()
            sets.append((tier_mapping_name(prefix, key), raw))
            self.ring.bind(slot, key, raw)
        pipe = self.meta.client.pipeline(transaction=False)
        replace_if_unchanged(pipe, [(tier_mapping_name(prefix, k), m) for k, m in evicted], sets, MAPPING_TTL_S)
        now = time.monotonic()
        if now - self._record_at >= RECORD_REFRESH_S:
            pipe.set(tier_owner_name(prefix, self.owner), self._record_raw, ex=RECORD_TTL_S)
            self._record_at = now
        pipe.execute()
        return len(sets)

    def abandon(self) -> None:
        """Forget the staged slots of a save that failed (they stay unbound: free to reuse)."""
        self._staged = []

    def close(self) -> None:
        """Withdraw the record and the mappings this tier still holds (readers then fall back)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)  # no renewal may land after the record's deletion
        bound = self.ring.bound()
        pipe = self.meta.client.pipeline(transaction=False)
        pipe.delete(tier_owner_name(self.meta.prefix, self.owner))
        replace_if_unchanged(pipe, [(tier_mapping_name(self.meta.prefix, k), m) for k, m in bound], [], MAPPING_TTL_S)
        pipe.execute()


def export_handle(buffer: torch.Tensor) -> tuple[Any, ...]:
    """The CUDA IPC handle of ``buffer``'s storage (the whole of it: ``buffer`` must start it)."""
    if buffer.storage_offset() != 0:
        raise ValueError("a device tier buffer must start its storage")
    storage = buffer.untyped_storage()
    device, handle, size, offset, ref_file, ref_offset, event, event_sync = storage._share_cuda_()  # type: ignore[no-untyped-call]
    return (int(device), bytes(handle), int(size), int(offset), bytes(ref_file), int(ref_offset), bytes(event),
            bool(event_sync))


Opener = Callable[[OwnerRecord], Any]  # an owner's buffer, mapped here (a uint8 tensor of n_slots * slot_bytes)


def ipc_opener(device: torch.device) -> Opener:
    """Open an owner's buffer on this process's ``device``: CUDA maps memory of another GPU of
    the node through peer access, also one this process cannot see (CUDA_VISIBLE_DEVICES), so
    the owner's device index, meaningless here, is not used."""
    index = device.index if device.index is not None else torch.cuda.current_device()

    def open_record(rec: OwnerRecord) -> torch.Tensor:
        _dev, handle, size, offset, ref_file, ref_offset, event, event_sync = rec.handle
        if size < rec.n_slots * rec.slot_bytes:
            raise ValueError(f"the owner's storage holds {size} B, its record says {rec.n_slots} x {rec.slot_bytes}")
        storage = torch.UntypedStorage._new_shared_cuda(index, handle, size, offset, ref_file, ref_offset, event,
                                                        event_sync)
        return torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(
            storage, 0, (rec.n_slots * rec.slot_bytes,), (1,))

    return open_record


@dataclass(frozen=True)
class TierSources:
    """What the device tier offers for a request: chunk ``idx[j]``'s copy is ``srcs[j]`` (a
    view of an owner's slot, still to be verified); ``failed`` chunks had a mapping worth a pull
    but no buffer to pull from (owner gone, handle not opening here)."""

    idx: list[int]
    srcs: list[Any]
    failed: int


_Hit = tuple[int, TierMapping]  # (the chunk's index in the request, its mapping)


@dataclass(frozen=True)
class _Opened:
    raw: bytes  # the owner record it was opened from ("" for this process's own tier)
    buffer: Any | None  # None: the open failed; not retried until the record changes
    slot_bytes: int
    n_slots: int


class TierReader:
    """The reader side, in any CUDA engine that loads: which of a request's chunks to pull
    from which owner's buffer. ``own`` is this process's own tier (read directly, no IPC)."""

    def __init__(self, meta: MetadataStore, node_id: str, opener: Opener, own: DeviceTier | None = None) -> None:
        self.meta = meta
        self.node_id = node_id
        self._opener = opener
        self._own = own
        self._opened: dict[str, _Opened] = {}  # owner -> its buffer, for other processes' tiers

    def sources(self, keys: Sequence[bytes], locs: Sequence[ChunkLocation], chunk_bytes: int) -> TierSources:
        """One pipeline (the chunks' mappings, the records of the owners already open); another
        MGET only for owners seen for the first time."""
        if not keys:
            return TierSources([], [], 0)
        prefix = self.meta.prefix
        cached = list(self._opened)
        pipe = self.meta.client.pipeline(transaction=False)
        pipe.mget([tier_mapping_name(prefix, k) for k in keys])
        if cached:
            pipe.mget([tier_owner_name(prefix, o) for o in cached])
        replies = pipe.execute()
        records: dict[str, bytes | None] = dict(zip(cached, replies[1], strict=True)) if cached else {}
        wanted = self.choose(replies[0], locs)
        new = [o for o in wanted if o not in records and not self._is_own(o)]
        if new:
            records.update(zip(new, self.meta.client.mget([tier_owner_name(prefix, o) for o in new]), strict=True))
        self._drop_stale(records)
        idx: list[int] = []
        srcs: list[Any] = []
        failed = 0
        for owner, hits in wanted.items():
            buf = self._buffer(owner, records.get(owner))
            for i, m in hits:
                if buf is None or buf.buffer is None or buf.slot_bytes != chunk_bytes or not 0 <= m.slot < buf.n_slots:
                    failed += 1
                    continue
                idx.append(i)
                srcs.append(buf.buffer[m.slot * chunk_bytes : (m.slot + 1) * chunk_bytes])
        return TierSources(idx, srcs, failed)

    def choose(self, raws: Sequence[bytes | None], locs: Sequence[ChunkLocation]) -> dict[str, list[_Hit]]:
        """The mappings worth a pull, by owner: on this node, and holding the checksum of the
        location the reader looked up (another checksum is another save's bytes)."""
        wanted: dict[str, list[_Hit]] = {}
        for i, (raw, loc) in enumerate(zip(raws, locs, strict=True)):
            if raw is None:
                continue
            try:
                m = TierMapping.decode(raw)
            except (ValueError, TypeError, msgpack.UnpackException):
                continue
            if m.node_id == self.node_id and m.checksum == loc.checksum:
                wanted.setdefault(m.owner, []).append((i, m))
        return wanted

    def _is_own(self, owner: str) -> bool:
        return self._own is not None and owner == self._own.owner

    def _buffer(self, owner: str, raw: bytes | None) -> _Opened | None:
        """The owner's buffer: this process's own tier as is; another's opened once per record
        (a changed record is a restarted owner: reopened); None without a record."""
        own = self._own
        if own is not None and self._is_own(owner):
            return _Opened(b"", own.buffer, own.slot_bytes, own.ring.n_slots)
        if raw is None:
            return None
        entry = self._opened.get(owner)
        if entry is None or entry.raw != raw:
            entry = self._opened[owner] = self._open(owner, raw)
        return entry

    def _open(self, owner: str, raw: bytes) -> _Opened:
        try:
            rec = OwnerRecord.decode(raw)
            if rec.node_id != self.node_id or rec.pid == os.getpid():
                raise ValueError(f"owner on node {rec.node_id}, pid {rec.pid}: not another process of this node")
            buffer = self._opener(rec)
        except Exception as e:
            log.warning("device tier %s does not open here, its chunks take the host path: %s: %s",
                        owner, type(e).__name__, e)
            return _Opened(raw, None, 0, 0)
        log.info("opened device tier %s (%d slots of %d B, GPU %s)", owner, rec.n_slots, rec.slot_bytes,
                 rec.device_uuid)
        return _Opened(raw, buffer, rec.slot_bytes, rec.n_slots)

    def _drop_stale(self, records: dict[str, bytes | None]) -> None:
        """Unmap the owners whose record vanished or changed (``records`` holds every open one)."""
        for owner, entry in list(self._opened.items()):
            if records.get(owner) != entry.raw:
                del self._opened[owner]

    def close(self) -> None:
        self._opened.clear()
