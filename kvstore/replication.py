"""Hot-chunk replication: a node whose readers keep pulling the same chunks from other nodes
keeps copies of them in its own segment.

Once this node's readers have pulled a chunk from other nodes ``after`` times (a shared
system prompt, the earlier turns of a conversation that a decode node loads on every turn),
a background thread pulls it once more, one-sided like any remote read, from the node that
holds it straight into a slot of this node's segment, verifies it as it lands, and commits it
as this node's replica (``MetadataStore.commit(replica=True)``: the committed copy stays where
it is and stays the one other nodes read). From then on lookups on this node
(``MetadataStore.lookup(near=...)``) find the replica first, so the chunk loads from shared
memory, and the router's store index learns from the ``stored`` event that this node holds it.

    reader thread:   batch_get ... pulled(items) -> count; the ``after``-th pull queues it
    replicator:      allocate here -> pull into the slots -> verify -> seal -> commit replica
                                          (any doubt: abort the slots, count a failure)

The request path pays a counter and, once per hot chunk, a queue put; the pull, the
verification and the commit run on the replicator's thread with a transport connection of its
own, so a replication never waits behind a request's read or holds one up. A replica is an
ordinary chunk of this node's agent: evicted under pressure by LRU, dropped with the node,
re-published after a Redis restart (as a replica), never the only copy a correct answer
depends on (a miss recomputes). Bounded: the pull counts are an LRU of ``track`` keys and at
most ``max_queued`` chunks wait; past that, offers are dropped (and counted).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import groupby

from kvstore.agent import CommitEntry
from kvstore.agent_rpc import AgentClient
from kvstore.logging import get_logger
from kvstore.metadata import AgentInfo, ChunkLocation
from kvstore.segment import HEADER_BYTES, Segment
from kvstore.transport.base import Transport, TransportError
from kvstore.verify import LandingDigests

log = get_logger(__name__)

Item = tuple[bytes, ChunkLocation]  # a chunk key and the location it was pulled from
_BATCH = 64  # chunks replicated per pass: one allocate and one commit call each


class PullCounts:
    """How often this node pulled each chunk from another node, for the ``track`` chunks
    pulled most recently (an LRU: a chunk pulled once long ago is forgotten)."""

    def __init__(self, after: int, track: int = 1 << 16) -> None:
        if after < 1:
            raise ValueError("replication needs after >= 1 pulls")
        self.after, self.track = after, track
        self._counts: OrderedDict[bytes, int] = OrderedDict()

    def hot(self, items: Sequence[Item]) -> list[Item]:
        """Count one pull of each item; the ones this pull made hot (each once: its count
        starts over, so a replica evicted later is made again only if it is pulled again)."""
        counts, out = self._counts, []
        for key, loc in items:
            n = counts.pop(key, 0) + 1
            if n >= self.after:
                out.append((key, loc))
            else:
                counts[key] = n
        while len(counts) > self.track:
            counts.popitem(last=False)
        return out


class Replicator:
    """Counts pulls and replicates the hot chunks on a thread of its own (started on the first
    hot chunk). ``agent_of(node)`` finds a node's agent; ``segment_of(name)`` maps this node's
    segment; ``transport`` is a remote transport used by this thread only."""

    def __init__(
        self, node_id: str, after: int, agent_of: Callable[[str], tuple[AgentInfo, AgentClient]],
        segment_of: Callable[[str], Segment], transport: Transport, max_queued: int = 4096,
    ) -> None:
        self.node_id = node_id
        self._counts = PullCounts(after)
        self._agent_of, self._segment_of, self._transport = agent_of, segment_of, transport
        self._queue: queue.Queue[Item | None] = queue.Queue(max_queued)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the counters and the thread's start
        self._closed = False
        self.counters: dict[str, int] = {}

    def pulled(self, items: Sequence[Item]) -> None:
        """A reader delivered these chunks from other nodes (the request path: cheap)."""
        if not items or self._closed:
            return
        for item in self._counts.hot(items):
            self._start()
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self._count("replication_dropped", 1)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued chunk is replicated or given up (tests, shutdown)."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout_s)

    def drain_counters(self) -> dict[str, int]:
        with self._lock:
            out, self.counters = self.counters, {}
        return out

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            try:  # behind what is queued: those finish first (a full queue: the join times out)
                self._queue.put(None, timeout=1.0)
            except queue.Full:
                pass
            self._thread.join(timeout=10)
        self._transport.close()

    def _count(self, name: str, n: int) -> None:
        if n:
            with self._lock:
                self.counters[name] = self.counters.get(name, 0) + n

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="pdkv-replicate", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # seen after this batch
                    self._queue.task_done()
                    break
                batch.append(item)
            try:
                self._replicate(batch)
            except Exception as e:  # a replica is an optimisation: never let it take a reader down
                self._count("replication_failures", len(batch))
                log.debug("replication of %d chunks failed: %s", len(batch), e)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _replicate(self, batch: list[Item]) -> None:
        """Pull ``batch`` into slots of this node's segment and commit the ones that verify."""
        info, agent = self._agent_of(self.node_id)
        offsets = agent.allocate([loc.length for _, loc in batch])
        self._count("replication_dropped", len(batch) - len(offsets))  # the segment is full of pinned data
        placed = list(zip(batch, offsets))  # noqa: B905 (a prefix of batch got a slot)
        good: list[CommitEntry] = []
        try:
            segment = self._segment_of(info.segment)
            by_source = sorted(placed, key=lambda p: p[0][1].node_id)
            for node, group in groupby(by_source, key=lambda p: p[0][1].node_id):
                good += self._pull(segment, node, list(group))
        finally:
            committed = agent.commit(good, replica=True) if good else 0
            taken = {e.offset for e in good}
            left = [off for _, off in placed if off not in taken]
            if left:
                agent.abort(left)
        self._count("replicated_chunks", committed)
        self._count("replication_failures", len(placed) - len(good))

    def _pull(self, segment: Segment, node: str, placed: list[tuple[Item, int]]) -> list[CommitEntry]:
        """One node's chunks, each pulled straight into its slot here (runs of slots adjacent
        here land in one read); the entries of those that verified."""
        src, _ = self._agent_of(node)
        out: list[CommitEntry] = []
        for run in _adjacent_runs(placed):
            keys = [key for (key, _), _ in run]
            locs = [loc for (_, loc), _ in run]
            lengths = [HEADER_BYTES + loc.length for loc in locs]
            start = run[0][1]
            landing = LandingDigests(keys, [loc.length for loc in locs], [loc.checksum for loc in locs])
            verdicts: list[str] = ["unread"] * len(run)

            def judge(j: int, slot: memoryview, landing: LandingDigests = landing,
                      verdicts: list[str] = verdicts) -> None:
                verdicts[j] = landing.verdict(j, slot)

            try:
                self._transport.read(src, [loc.offset for loc in locs], lengths, judge,
                                     segment.buf[start : start + sum(lengths)], landing.landed)
            except (TransportError, OSError) as e:  # source gone or slot reused: these stay unread
                log.debug("replica pull from %s failed: %s", node, e)
            for ((key, loc), off), verdict in zip(run, verdicts, strict=True):
                if verdict == "ok":
                    segment.seal(off, key, loc.length, loc.checksum)  # the header as this node writes it
                    segment.touch(off)  # a use now, as a commit is (not the source node's stamp)
                    out.append(CommitEntry(key, off, loc.length, loc.checksum))
        return out


def _adjacent_runs(placed: list[tuple[Item, int]]) -> list[list[tuple[Item, int]]]:
    """``placed`` (item, local offset) split where the next slot does not start right after
    the previous one: each run is one read landing back to back."""
    runs: list[list[tuple[Item, int]]] = []
    for item, off in placed:
        prev = runs[-1][-1] if runs else None
        if prev is not None and prev[1] + HEADER_BYTES + prev[0][1].length == off:
            runs[-1].append((item, off))
        else:
            runs.append([(item, off)])
    return runs
