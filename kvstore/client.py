"""What an engine process uses to reach the store: Redis for metadata, the agents for slots,
and a transport for bytes (the mapped segment on this node, tcp or grpc to others).

Batch calls work on the chunks of one request at a time: one Redis round trip to find them,
one streamed transfer per (node, contiguous run); same-node reads pin their slots with file
locks (no call to the agent). ``batch_get``
never raises for a chunk it could not deliver: it reports per chunk, and counts why, so the
connector can turn exactly those chunks into recompute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kvstore.agent import CommitEntry
from kvstore.agent_rpc import AgentClient, AgentUnavailable
from kvstore.logging import get_logger
from kvstore.metadata import AgentInfo, ChunkLocation, MetadataStore, connect
from kvstore.peer_auth import PeerAuth, TlsFiles
from kvstore.read_paths import deliver_group, deliver_slot, hand_over, read_split
from kvstore.replication import Replicator
from kvstore.segment import (
    CHECK_BLOCK,
    HEADER_BYTES,
    SlotCorrupt,
    check_header,
    seal_slot,
)
from kvstore.transport import REMOTE_TRANSPORTS, ShmTransport, Transport, TransportError
from kvstore.transport.base import slot_spans
from kvstore.verify import LandingDigests

log = get_logger(__name__)

# Upper bounds (seconds) of the transfer latency histogram, Prometheus style (plus +Inf).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_INFO_TTL_S = 2.0
# Slots at least this large are verified (xxh3, which runs without the GIL) off the caller's
# thread alone: from another node on a helper thread while the next slots arrive; on this node
# by the caller and a helper together, block by block (copy with ctypes.memmove, also without
# the GIL, then hash). Smaller ones inline, where a thread hand-off costs more than it hides.
OVERLAP_MIN_BYTES = 512 << 10
OVERLAP_GROUP_BYTES = 4 << 20  # slots handed over together: one thread hand-off per ~4 MiB

# fill(i, payload): write chunk i's bytes into payload; return their checksum (segment.checksum
# of exactly those bytes) if it took it while writing, so the seal need not read them again,
# or None to have the client hash them.
Fill = Callable[[int, memoryview], int | None]
# fill_all(payloads): write every chunk's bytes, chunk i into payloads[i], in one call (the
# CUDA path gathers, hashes and copies a request's chunks at once); returns, per chunk, its
# checksum or None, as Fill does.
FillAll = Callable[[Sequence[memoryview]], Sequence[int | None]]
# check(idx, payloads, checksums): copy the unverified payloads of chunks idx out (all pinned
# during the call), verify each copy against the checksum its slot must have, keep only the
# ones that match; returns, per entry of idx, whether it matched.
SelfVerified = Callable[[Sequence[int], Sequence[memoryview], Sequence[int]], Sequence[bool]]


class StoreError(Exception):
    pass


class NoAgent(StoreError):
    """No Store Agent is registered for the node."""



@dataclass(frozen=True)
class ChunkToSave:
    key: bytes
    nbytes: int


@dataclass
class Placement:
    """Slots reserved by ``StoreClient.place`` and not yet sealed: chunk i goes into
    ``payloads[i]`` (a view of the segment on this node, of the client's staging buffer for
    another), then ``finish`` seals and commits them or ``abort`` gives them back::

        place --> (payloads written) --> finish: seal + commit
                                    `--> abort: slots freed (also on any failure in finish)
    """

    target: str
    info: AgentInfo
    agent: AgentClient
    chunks: list[ChunkToSave]  # the placed prefix of the chunks asked for
    offsets: list[int]
    payloads: list[memoryview]
    remote: bool = False
    closed: bool = False  # finished or aborted


def histogram_fields(name: str, seconds: float) -> dict[str, int]:
    """Counter increments that add one observation to a cumulative histogram stored as
    plain counters (``<name>_bucket:<le>``, ``<name>_count``, ``<name>_sum_us``)."""
    fields = {f"{name}_count": 1, f"{name}_sum_us": int(seconds * 1e6)}
    for le in LATENCY_BUCKETS:
        if seconds <= le:
            fields[f"{name}_bucket:{le}"] = 1
    fields[f"{name}_bucket:+Inf"] = 1
    return fields


class StoreClient:
    def __init__(
        self, redis_url: str, prefix: str, node_id: str, timeout_s: float = 1.0, transport: str = "tcp",
        tls: TlsFiles | dict[str, str] | None = None, replicate_after: int = 0,
    ) -> None:
        if transport not in REMOTE_TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; choose from {sorted(REMOTE_TRANSPORTS)}")
        self.node_id = node_id
        self.meta = MetadataStore(connect(redis_url, timeout_s), prefix)
        self._timeout_s = timeout_s
        self._auth = PeerAuth.for_store(redis_url, prefix, tls)
        self._agents = _Agents(self.meta, self._auth, timeout_s * 2)
        self.shm = ShmTransport()
        self.remote: Transport = REMOTE_TRANSPORTS[transport](self._auth, timeout_s=max(5.0, timeout_s))
        self._staging = bytearray()
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="pdkv-verify")
        self.counters: dict[str, int] = {}
        # Hot chunks pulled from other nodes get a replica on this one (kvstore.replication);
        # its thread has its own transport connection and its own agent directory (the request
        # path's is not shared across threads), which looks each node up again every batch.
        self._replica_agents = _Agents(self.meta, self._auth, timeout_s * 2, info_ttl_s=0.0)
        self._replicator = None if replicate_after <= 0 else Replicator(
            node_id, replicate_after, self._replica_agents.get, self.shm.segment,
            REMOTE_TRANSPORTS[transport](self._auth, timeout_s=max(5.0, timeout_s)))

    # -- counters -------------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        if n:
            self.counters[name] = self.counters.get(name, 0) + n

    def drain_counters(self) -> dict[str, int]:
        out, self.counters = self.counters, {}
        if self._replicator is not None:
            for name, n in self._replicator.drain_counters().items():
                out[name] = out.get(name, 0) + n
        return out

    # -- lookups --------------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> list[ChunkLocation | None]:
        """Where each chunk is; with replication on, this node's replica before the
        committed copy (same round trip)."""
        return self.meta.lookup(keys, near=self.node_id if self._replicator is not None else "")

    def batch_exists(self, keys: Sequence[bytes]) -> list[bool]:
        return self.meta.exists(keys)

    # -- puts -----------------------------------------------------------------------------

    def batch_put(
        self, chunks: Sequence[ChunkToSave], fill: Fill, node_id: str | None = None,
    ) -> int:
        """Store chunks on ``node_id`` (default: this node). ``fill(i, payload)`` writes chunk
        i's bytes: in place in the segment on this node, into a staging buffer that the
        transport ships for another node; a digest it returns is sealed as the chunk's
        checksum (see ``Fill``). Returns how many were stored (a prefix of
        ``chunks`` when the segment is full of pinned data)."""
        return self.batch_put_all(chunks, lambda payloads: [fill(i, p) for i, p in enumerate(payloads)], node_id)

    def batch_put_all(
        self, chunks: Sequence[ChunkToSave], fill_all: FillAll, node_id: str | None = None,
    ) -> int:
        """``batch_put`` with one ``fill_all(payloads)`` call for every chunk it could place
        (see ``FillAll``); the seals follow it. ``place`` + ``finish`` in one call."""
        if not chunks:
            return 0
        placed = self.place(chunks, node_id)
        try:
            digests = _filled(fill_all, placed.payloads)
        except BaseException:
            self.abort(placed)
            raise
        return self.finish(placed, digests)

    def place(self, chunks: Sequence[ChunkToSave], node_id: str | None = None) -> Placement:
        """Reserve slots for ``chunks`` on ``node_id`` (default: this node) and hand out their
        payload views, to be written at the caller's pace (the CUDA path writes a step's
        chunks layer by layer during the forward). Only a prefix of ``chunks`` may be placed
        (the segment is full of pinned data): ``Placement.chunks``. Every placement ends in
        exactly one ``finish`` or ``abort``; until then its slots are pending (the agent
        reclaims pending slots of a caller that vanished after its timeout). On another node
        the payloads are the client's staging buffer, so one such placement at a time."""
        target = node_id or self.node_id
        info, agent = self._agents.get(target)
        offsets = agent.allocate([c.nbytes for c in chunks]) if chunks else []
        chunks = list(chunks[: len(offsets)])
        try:
            if target == self.node_id:
                segment = self.shm.segment(info.segment)
                payloads = [segment.payload(o, c.nbytes) for c, o in zip(chunks, offsets, strict=True)]
                return Placement(target, info, agent, chunks, offsets, payloads)
            lengths = [HEADER_BYTES + c.nbytes for c in chunks]
            if len(self._staging) < sum(lengths):
                self._staging = bytearray(sum(lengths))
            staging = memoryview(self._staging)
            payloads = [staging[a + HEADER_BYTES : a + HEADER_BYTES + c.nbytes]
                        for c, (a, _b) in zip(chunks, slot_spans(lengths), strict=True)]
            return Placement(target, info, agent, chunks, offsets, payloads, remote=True)
        except BaseException:
            _abort_quietly(agent, offsets)
            raise

    def finish(self, placed: Placement, digests: Sequence[int | None]) -> int:
        """Seal each placed chunk (with its digest, or hashing it where None), ship it if the
        placement is on another node, and commit; returns how many were stored. Any failure
        aborts the placement's slots and raises."""
        if placed.closed:
            raise StoreError("this placement was already finished or aborted")
        if len(digests) != len(placed.chunks):
            self.abort(placed)
            raise ValueError(f"{len(digests)} digests for {len(placed.chunks)} placed chunks")
        if not placed.chunks:
            placed.closed = True
            return 0
        try:
            if placed.remote:
                entries = self._seal_and_ship(placed, digests)
            else:
                entries = self._seal_in_place(placed, digests)
            stored = placed.agent.commit(entries)
        except BaseException:
            self.abort(placed)
            raise
        placed.closed = True
        return stored

    def abort(self, placed: Placement) -> None:
        """Give a placement's slots back unwritten (idempotent; never raises for an agent that
        is gone: it reclaims pending slots itself)."""
        if placed.closed:
            return
        placed.closed = True
        if placed.offsets:
            _abort_quietly(placed.agent, placed.offsets)

    def _seal_in_place(self, placed: Placement, digests: Sequence[int | None]) -> list[CommitEntry]:
        segment = self.shm.segment(placed.info.segment)
        entries = []
        for chunk, offset, digest in zip(placed.chunks, placed.offsets, digests, strict=True):
            digest = segment.seal(offset, chunk.key, chunk.nbytes, digest)
            entries.append(CommitEntry(chunk.key, offset, chunk.nbytes, digest))
        self.count("bytes_out_shm", sum(HEADER_BYTES + c.nbytes for c in placed.chunks))
        return entries

    def _seal_and_ship(self, placed: Placement, digests: Sequence[int | None]) -> list[CommitEntry]:
        lengths = [HEADER_BYTES + c.nbytes for c in placed.chunks]
        staging = memoryview(self._staging)
        entries = []
        for i, (chunk, (a, _b)) in enumerate(zip(placed.chunks, slot_spans(lengths), strict=True)):
            digest = seal_slot(staging, a, chunk.key, chunk.nbytes, digests[i])
            entries.append(CommitEntry(chunk.key, placed.offsets[i], chunk.nbytes, digest))
        self.remote.write(placed.info, placed.offsets, lengths, staging)
        self.count(f"bytes_out_{self.remote.name}", sum(lengths))
        return entries

    # -- gets -----------------------------------------------------------------------------

    def batch_get(
        self, keys: Sequence[bytes], locs: Sequence[ChunkLocation], on_chunk: Callable[[int, memoryview], None],
        dest: memoryview | None = None,
    ) -> list[bool]:
        """Deliver each chunk's verified payload to ``on_chunk(i, payload)`` (a view valid
        during the call). With ``dest`` (at least sum of HEADER_BYTES + length bytes), slot i
        lands at its position in input order and its payload view points there. Returns,
        per chunk, whether it was delivered; failures are counted, never raised.

        With large slots from another node ``on_chunk`` runs on a helper thread, while the
        next slots arrive; on this node it runs on the caller's thread, in order, once both
        threads have verified the run. Its calls never overlap, and all have returned when
        ``batch_get`` does."""
        ok = [False] * len(keys)
        spans = slot_spans([HEADER_BYTES + loc.length for loc in locs])
        by_node: dict[str, list[int]] = {}
        for i, loc in enumerate(locs):
            by_node.setdefault(loc.node_id, []).append(i)
        for node, idxs in by_node.items():
            for run in _contiguous_runs(idxs):
                run_dest = None if dest is None else dest[spans[run[0]][0] : spans[run[-1]][1]]
                self._get_run(node, run, keys, locs, on_chunk, run_dest, ok)
        if self._replicator is not None:
            self._replicator.pulled([(keys[i], locs[i]) for i in range(len(keys))
                                     if ok[i] and locs[i].node_id != self.node_id])
        return ok

    def batch_get_self_verified(
        self, keys: Sequence[bytes], locs: Sequence[ChunkLocation], check: SelfVerified,
        on_chunk: Callable[[int, memoryview], None],
    ) -> list[bool]:
        """``batch_get`` for a caller that verifies the bytes itself, after copying them (the
        CUDA KV path hashes its GPU copy: the host never reads the payload).

        The chunks on this node are pinned, their headers checked, and ``check(idx,
        payloads, checksums)`` called ONCE with all their unverified payloads while the pins
        hold; it returns, per chunk, whether its copy matched. False is a checksum failure
        like ``batch_get``'s own: counted, the chunk not delivered, the slot dropped. Chunks
        on other nodes are verified by the client as they land (``batch_get``), so they go
        to ``on_chunk(i, payload)`` as verified payloads, not through ``check`` (which would
        hash them again). Never raises for a chunk; returns, per chunk, whether it was
        delivered."""
        ok = [False] * len(keys)
        remote = [i for i, loc in enumerate(locs) if loc.node_id != self.node_id]
        if remote:
            got = self.batch_get([keys[i] for i in remote], [locs[i] for i in remote],
                                 lambda j, payload: on_chunk(remote[j], payload))
            for i, delivered in zip(remote, got, strict=True):
                ok[i] = delivered
        local = [i for i, loc in enumerate(locs) if loc.node_id == self.node_id]
        if local:
            self._get_local_self_verified(local, keys, locs, check, ok)
        return ok

    def _get_local_self_verified(
        self, run: list[int], keys: Sequence[bytes], locs: Sequence[ChunkLocation], check: SelfVerified,
        ok: list[bool],
    ) -> None:
        started = time.perf_counter()
        pinned: list[int] = []
        segment = None
        settled = 0  # chunks of run with a counted verdict
        try:
            info, agent = self._agents.get(self.node_id)
            segment = self.shm.segment(info.segment)
            for i in run:
                loc = locs[i]
                if not segment.locks.try_shared(loc.offset, HEADER_BYTES + loc.length):
                    self.count("slot_busy")  # being evicted right now
                    settled += 1
                    continue
                pinned.append(i)  # the pin holds until check has its copy and its verdict
            good = []
            for i in pinned:
                try:
                    check_header(segment.buf, locs[i].offset, keys[i], locs[i].length, locs[i].checksum)
                    good.append(i)
                except SlotCorrupt:
                    self.count("slot_mismatches")
                    settled += 1
            verdicts = check(good, [segment.payload(locs[i].offset, locs[i].length) for i in good],
                             [locs[i].checksum for i in good]) if good else []
            if len(verdicts) != len(good):
                raise ValueError(f"check judged {len(verdicts)} of {len(good)} chunks")
            damaged: list[tuple[int, bytes]] = []
            settled += len(good)
            for i, matched in zip(good, verdicts, strict=True):
                if matched:
                    ok[i] = True
                    segment.touch(locs[i].offset)  # a use, for the agent's LRU
                else:
                    self.count("checksum_failures")
                    damaged.append((locs[i].offset, keys[i]))
            if damaged:  # drop them, so the next save stores a good copy
                agent.discard(damaged)
        except (StoreError, AgentUnavailable, TransportError, OSError) as e:
            self._agents.forget(self.node_id)
            self.count("get_failures", len(run) - settled)
            log.debug("self-verified get on this node failed: %s", e)
        finally:
            for i in pinned:
                segment.locks.unlock(locs[i].offset, HEADER_BYTES + locs[i].length)  # type: ignore[union-attr]
        self._count_loaded("local", self.shm.name, run, locs, ok, started)

    def _get_run(
        self, node: str, run: list[int], keys: Sequence[bytes], locs: Sequence[ChunkLocation],
        on_chunk: Callable[[int, memoryview], None], dest: memoryview | None, ok: list[bool],
    ) -> None:
        local = node == self.node_id
        transport = self.shm if local else self.remote
        started = time.perf_counter()
        pinned: list[int] = []
        segment = None
        try:
            info, agent = self._agents.get(node)
            if local:  # pin the slots so eviction cannot reuse them under the copy
                segment = self.shm.segment(info.segment)
                pinned = [i for i in run if segment.locks.try_shared(locs[i].offset, HEADER_BYTES + locs[i].length)]
                self.count("slot_busy", len(run) - len(pinned))  # being evicted right now
                if dest is not None and len(pinned) != len(run):
                    dest = None  # the run is no longer contiguous in dest: copy chunk by chunk
                run = pinned
            lengths = [HEADER_BYTES + locs[i].length for i in run]
            damaged: list[tuple[int, bytes]] = []
            pending: list[Future[list[tuple[int, str]]]] = []

            def settle(i: int, verdict: str) -> None:
                if verdict == "ok":
                    ok[i] = True
                    if segment is not None:
                        segment.touch(locs[i].offset)  # a use, for the agent's LRU
                    return
                self.count(verdict)
                if verdict == "checksum_failures":
                    damaged.append((locs[i].offset, keys[i]))

            overlap = min(lengths, default=0) >= OVERLAP_MIN_BYTES  # whole run, so calls never overlap
            group: list[tuple[int, memoryview]] = []
            # From another node each block is hashed as it lands (kvstore.verify): a slot is
            # verified when its last byte is in, and only on_chunk is left for the helper.
            landing = None if local else LandingDigests([keys[i] for i in run], [locs[i].length for i in run],
                                                        [locs[i].checksum for i in run])

            def hand_off() -> None:
                if group:
                    deliver = hand_over if landing is not None else deliver_group
                    pending.append(self._verifier.submit(deliver, list(group), keys, locs, on_chunk))
                    group.clear()

            def on_slot(j: int, slot: memoryview) -> None:
                i = run[j]
                if landing is not None:
                    verdict = landing.verdict(j, slot)
                    if verdict != "ok":
                        settle(i, verdict)
                        return
                    slot = slot[HEADER_BYTES:]
                    if not overlap:
                        on_chunk(i, slot)
                        ok[i] = True  # settle's "ok" (no pin to touch from another node)
                        return
                elif not overlap:
                    settle(i, deliver_slot(i, keys[i], locs[i], slot, on_chunk))
                    return
                group.append((i, slot))  # handed over while the next ones arrive
                if sum(len(s) for _, s in group) >= OVERLAP_GROUP_BYTES:
                    hand_off()

            try:
                if local and overlap and (len(run) > 1 or lengths[0] > HEADER_BYTES + CHECK_BLOCK):
                    buf = self.shm.segment(info.segment).buf
                    for i, verdict in read_split(buf, self._verifier, run, lengths, keys, locs, on_chunk, dest):
                        settle(i, verdict)
                else:
                    transport.read(info, [locs[i].offset for i in run], lengths, on_slot, dest,
                                   None if landing is None else landing.landed)
            finally:  # every complete slot is settled before its pin or its buffer goes away
                hand_off()
                error = None
                for fut in pending:
                    try:
                        for i, verdict in fut.result():
                            settle(i, verdict)
                    except Exception as e:
                        error = error or e
                if error is not None:
                    raise error
            if damaged:  # drop them, so the next save stores a good copy
                agent.discard(damaged)
        except (StoreError, AgentUnavailable, TransportError, OSError) as e:
            self._agents.forget(node)
            self.count("get_failures", sum(1 for i in run if not ok[i]))
            log.debug("get from node %s failed: %s", node, e)
        finally:
            for i in pinned:
                segment.locks.unlock(locs[i].offset, HEADER_BYTES + locs[i].length)  # type: ignore[union-attr]
        self._count_loaded("local" if local else "remote", transport.name, run, locs, ok, started)

    def _count_loaded(self, source: str, transport: str, run: list[int], locs: Sequence[ChunkLocation],
                      ok: list[bool], started: float) -> None:
        """A get's counters: chunks and bytes delivered from ``source`` over ``transport``,
        and, if any arrived, its time since ``started`` in the latency histogram."""
        delivered = sum(1 for i in run if ok[i])
        self.count(f"loaded_{source}_chunks", delivered)
        self.count(f"bytes_in_{transport}", sum(HEADER_BYTES + locs[i].length for i in run if ok[i]))
        if delivered:
            for name, n in histogram_fields(f"get_seconds:{transport}", time.perf_counter() - started).items():
                self.count(name, n)

    # -- plumbing -------------------------------------------------------------------------

    def replicas_settled(self, timeout_s: float = 10.0) -> bool:
        """Wait until the hot chunks queued for replication are replicated or given up."""
        return self._replicator is None or self._replicator.drain(timeout_s)

    def close(self) -> None:
        if self._replicator is not None:
            self._replicator.close()
        self._replica_agents.close()
        self._agents.close()
        self._verifier.shutdown(wait=True)
        self.shm.close()
        self.remote.close()


class _Agents:
    """Where each node's agent is and a client for it: the info cached for ``info_ttl_s``
    (0: looked up on every call, for a thread that may outlive an agent's restart), one
    client per address."""

    def __init__(self, meta: MetadataStore, auth: PeerAuth, timeout_s: float, info_ttl_s: float = _INFO_TTL_S) -> None:
        self._meta, self._auth, self._timeout_s, self._ttl = meta, auth, timeout_s, info_ttl_s
        self._infos: dict[str, tuple[AgentInfo, float]] = {}
        self._clients: dict[str, AgentClient] = {}

    def get(self, node_id: str) -> tuple[AgentInfo, AgentClient]:
        now = time.monotonic()
        cached = self._infos.get(node_id)
        if cached is not None and now - cached[1] < self._ttl:
            info = cached[0]
        else:
            found = self._meta.agent(node_id)
            if found is None:
                raise NoAgent(f"no store agent registered for node {node_id}")
            info = found
            self._infos[node_id] = (info, now)
        client = self._clients.get(info.address)
        if client is None:
            client = self._clients[info.address] = AgentClient(info.address, self._auth, self._timeout_s)
        return info, client

    def forget(self, node_id: str) -> None:
        """Look the node up again next time (a call to its agent failed)."""
        self._infos.pop(node_id, None)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def _filled(fill_all: FillAll, payloads: list[memoryview]) -> list[int | None]:
    """fill_all's digests, one per payload."""
    taken = list(fill_all(payloads))
    if len(taken) != len(payloads):
        raise ValueError(f"fill returned {len(taken)} digests for {len(payloads)} chunks")
    return taken


def _abort_quietly(agent: AgentClient, offsets: list[int]) -> None:
    try:
        agent.abort(offsets)
    except AgentUnavailable:
        pass  # the agent reclaims abandoned slots after its pending timeout


def _contiguous_runs(idxs: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in idxs:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
