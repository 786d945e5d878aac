"""Chunk metadata in Redis: where each stored chunk lives, written atomically.

Keys (all under one prefix so a store can be listed or wiped without touching other data):

    {prefix}:c:<key hex>      -> msgpack [node_id, segment, offset, length, crc32]
    {prefix}:agent:<node_id>  -> msgpack AgentInfo fields
    {prefix}:stats            -> hash of counters (saved, hits, misses, evicted)
    {prefix}:events           -> pub/sub channel: msgpack ["stored"|"removed", node_id, [keys]]

A batch of chunks is committed with MULTI/EXEC so a reader sees all of it or none of it; the
removal of a chunk is compare-and-delete (a Lua script) so an agent never drops a location
that another agent has since written for the same content.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

DEFAULT_PREFIX = "pdkv"

# Delete each key only if it still holds the value this agent wrote.
_COMPARE_AND_DELETE = """
local n = 0
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[i] then
    redis.call('DEL', k)
    n = n + 1
  end
end
return n
"""


@dataclass(frozen=True)
class ChunkLocation:
    node_id: str
    segment: str
    offset: int
    length: int
    crc32: int

    def encode(self) -> bytes:
        return msgpack.packb(list(astuple(self)))

    @classmethod
    def decode(cls, raw: bytes) -> ChunkLocation:
        node_id, segment, offset, length, crc32 = msgpack.unpackb(raw)
        return cls(node_id, segment, offset, length, crc32)


@dataclass(frozen=True)
class AgentInfo:
    node_id: str
    segment: str
    capacity: int
    address: str  # host:port of the agent's gRPC server

    def encode(self) -> bytes:
        return msgpack.packb(list(astuple(self)))

    @classmethod
    def decode(cls, raw: bytes) -> AgentInfo:
        node_id, segment, capacity, address = msgpack.unpackb(raw)
        return cls(node_id, segment, capacity, address)


def connect(url: str, timeout_s: float = 1.0) -> redis.Redis:
    """A client that fails fast: on the KV path a slow or dead Redis must become a miss, not
    a stall. redis-py retries every failed command three times with exponential backoff by
    default, which would hold an engine's scheduler loop for seconds per lookup."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=0,
        retry=Retry(NoBackoff(), 0),
    )


class MetadataStore:
    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._cad = client.register_script(_COMPARE_AND_DELETE)

    def _chunk(self, key: bytes) -> str:
        return f"{self.prefix}:c:{key.hex()}"

    @property
    def events_channel(self) -> str:
        return f"{self.prefix}:events"

    # -- chunks ---------------------------------------------------------------------------

    def commit(self, entries: Sequence[tuple[bytes, ChunkLocation]]) -> None:
        if not entries:
            return
        pipe = self.client.pipeline(transaction=True)
        for key, loc in entries:
            pipe.set(self._chunk(key), loc.encode())
        pipe.hincrby(f"{self.prefix}:stats", "saved", len(entries))
        node = entries[0][1].node_id
        pipe.publish(self.events_channel, msgpack.packb(["stored", node, [k for k, _ in entries]]))
        pipe.execute()

    def lookup(self, keys: Sequence[bytes]) -> list[ChunkLocation | None]:
        if not keys:
            return []
        raw = self.client.mget([self._chunk(k) for k in keys])
        return [None if r is None else ChunkLocation.decode(r) for r in raw]

    def prefix_hits(self, keys: Sequence[bytes]) -> list[ChunkLocation]:
        """Locations of the longest stored prefix of ``keys`` (stops at the first miss)."""
        found: list[ChunkLocation] = []
        for loc in self.lookup(keys):
            if loc is None:
                break
            found.append(loc)
        return found

    def remove(self, entries: Iterable[tuple[bytes, ChunkLocation]]) -> int:
        entries = list(entries)
        if not entries:
            return 0
        names = [self._chunk(k) for k, _ in entries]
        removed = int(self._cad(keys=names, args=[loc.encode() for _, loc in entries]))
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(f"{self.prefix}:stats", "evicted", removed)
        node = entries[0][1].node_id
        pipe.publish(self.events_channel, msgpack.packb(["removed", node, [k for k, _ in entries]]))
        pipe.execute()
        return removed

    def add_counters(self, instance: str, counters: dict[str, int], now: float) -> None:
        """Add an engine's counters to the store totals and to its own hash."""
        pipe = self.client.pipeline(transaction=False)
        for name, n in counters.items():
            pipe.hincrby(f"{self.prefix}:stats", name, n)
            pipe.hincrby(f"{self.prefix}:stats:{instance}", name, n)
        pipe.hset(f"{self.prefix}:stats:{instance}", "updated_at", int(now))
        pipe.execute()

    def stats(self, instance: str | None = None) -> dict[str, int]:
        name = f"{self.prefix}:stats" if instance is None else f"{self.prefix}:stats:{instance}"
        raw = self.client.hgetall(name)
        return {k.decode(): int(v) for k, v in raw.items()}

    def clear_chunks(self) -> int:
        """Drop every chunk location (the bytes become unreachable; agents reclaim them)."""
        n = 0
        for name in self.client.scan_iter(f"{self.prefix}:c:*", count=1000):
            n += int(self.client.delete(name))
        return n

    # -- agents ---------------------------------------------------------------------------

    def register_agent(self, info: AgentInfo) -> None:
        self.client.set(f"{self.prefix}:agent:{info.node_id}", info.encode())

    def unregister_agent(self, node_id: str) -> None:
        self.client.delete(f"{self.prefix}:agent:{node_id}")

    def agent(self, node_id: str) -> AgentInfo | None:
        raw = self.client.get(f"{self.prefix}:agent:{node_id}")
        return None if raw is None else AgentInfo.decode(raw)

    def agents(self) -> list[AgentInfo]:
        names = list(self.client.scan_iter(f"{self.prefix}:agent:*", count=1000))
        return [AgentInfo.decode(r) for r in self.client.mget(names) if r is not None]
