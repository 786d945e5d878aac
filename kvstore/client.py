"""What an engine process uses to reach the store: Redis for metadata, the node's agent for
slots, and the mapped segment (or a remote pull) for bytes.

Every method raises on trouble (``StoreError`` subclasses or the underlying client's error);
the connector turns any of them into "recompute", never into a wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.agent import CommitEntry
from kvstore.agent_rpc import AgentClient
from kvstore.metadata import AgentInfo, ChunkLocation, MetadataStore, connect
from kvstore.segment import HEADER_BYTES, Segment, SlotCorrupt, check_slot


class StoreError(Exception):
    pass


class NoLocalAgent(StoreError):
    """No Store Agent is registered for this node."""


@dataclass(frozen=True)
class ChunkToSave:
    key: bytes
    nbytes: int


class StoreClient:
    def __init__(self, redis_url: str, prefix: str, node_id: str, timeout_s: float = 1.0) -> None:
        self.node_id = node_id
        self.meta = MetadataStore(connect(redis_url, timeout_s), prefix)
        self._timeout_s = timeout_s
        self._agents: dict[str, AgentClient] = {}
        self._segments: dict[str, Segment] = {}

    # -- lookups --------------------------------------------------------------------------

    def lookup_prefix(self, keys: Sequence[bytes]) -> list[ChunkLocation]:
        return self.meta.prefix_hits(keys)

    # -- saves ----------------------------------------------------------------------------

    def save(self, chunks: Sequence[ChunkToSave], fill: Callable[[int, memoryview], None]) -> int:
        """Allocate slots on this node's agent, let ``fill(i, payload)`` write chunk i in
        place, seal and commit. Returns how many chunks were stored (a prefix of ``chunks``
        when the segment is full)."""
        if not chunks:
            return 0
        info, agent = self._local_agent()
        segment = self._segment(info.segment)
        offsets = agent.allocate([c.nbytes for c in chunks])
        try:
            entries = []
            for i, offset in enumerate(offsets):
                chunk = chunks[i]
                fill(i, segment.payload(offset, chunk.nbytes))
                crc = segment.seal(offset, chunk.key, chunk.nbytes)
                entries.append(CommitEntry(chunk.key, offset, chunk.nbytes, crc))
            return agent.commit(entries)
        except BaseException:
            agent.abort(offsets)
            raise

    # -- loads ----------------------------------------------------------------------------

    def load(self, key: bytes, loc: ChunkLocation, consume: Callable[[memoryview], None]) -> None:
        """Hand the verified payload of one chunk to ``consume`` (which copies it out)."""
        if loc.node_id == self.node_id:
            segment = self._segment(loc.segment)
            consume(segment.verify(loc.offset, key, loc.length, loc.crc32))
            if not segment.still_holds(loc.offset, key):
                raise SlotCorrupt(f"slot at {loc.offset} was reused while it was read")
            return
        raw = self._agent(loc.node_id)[1].read(loc.offset, HEADER_BYTES + loc.length)
        consume(check_slot(memoryview(raw), 0, key, loc.length, loc.crc32))

    # -- plumbing -------------------------------------------------------------------------

    def _agent(self, node_id: str) -> tuple[AgentInfo, AgentClient]:
        info = self.meta.agent(node_id)
        if info is None:
            raise NoLocalAgent(f"no store agent registered for node {node_id}")
        client = self._agents.get(info.address)
        if client is None:
            client = self._agents[info.address] = AgentClient(info.address, self._timeout_s * 2)
        return info, client

    def _local_agent(self) -> tuple[AgentInfo, AgentClient]:
        return self._agent(self.node_id)

    def _segment(self, name: str) -> Segment:
        seg = self._segments.get(name)
        if seg is None:
            seg = self._segments[name] = Segment.attach(name)
        return seg

    def close(self) -> None:
        for client in self._agents.values():
            client.close()
        for seg in self._segments.values():
            seg.close()
        self._agents.clear()
        self._segments.clear()
