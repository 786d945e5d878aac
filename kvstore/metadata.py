"""Chunk metadata in Redis: where each stored chunk lives, written atomically.

Keys (all under one prefix so a store can be listed or wiped without touching other data):

    {prefix}:c:<key hex>      -> msgpack ChunkLocation of the chunk's committed copy
    {prefix}:r:<node>:<key hex> -> msgpack ChunkLocation of a replica on <node>: a hot chunk
                                 that node's readers kept pulling from another node
                                 (``kvstore/replication.py``), read there before the
                                 committed copy
    {prefix}:n:<node_id>      -> set of chunk keys committed (or replicated) by that node's agent
    {prefix}:agent:<node_id>  -> msgpack AgentInfo (where to find the agent)
    {prefix}:alive:<node_id>  -> present while the agent heartbeats (expires on its own)
    {prefix}:stats[:<inst>]   -> hash of counters (store totals, per engine instance)
    {prefix}:events           -> stream of store changes: {op: stored|removed, node, keys}
    {prefix}:dt:<key hex>     -> msgpack [owner, node, slot, checksum]: a copy in a device tier
    {prefix}:dtier:<owner>    -> msgpack owner record of a device tier (its CUDA IPC handle)

The last two are the device tier's (``kvstore/transport/cuda_ipc.py``): hints with a TTL, never
the only copy of a chunk; a reader trusts one only after its own checksum of the bytes.

A batch of chunks is committed with MULTI/EXEC after its bytes are complete, so a reader sees
all of it or none of it and never a location whose bytes are still being written. Removal is
compare-and-delete (a Lua script): an agent never drops a location that another agent has
since written for the same content. The change stream is a Redis stream, not pub/sub, so a
consumer that was away (a restarted router) resumes from the last id it saw instead of
silently missing changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass
from urllib.parse import unquote, urlsplit

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

DEFAULT_PREFIX = "pdkv"
EVENTS_MAXLEN = 100_000  # approximate cap on the change stream (XADD MAXLEN ~)

# Delete each key only if it still holds the value this agent wrote (the chunk's committed
# location, else this node's replica of it); drop it from the node's set either way (the set
# only ever means "this node may hold it").
_COMPARE_AND_DELETE = """
-- KEYS: chunk names; ARGV[1]: the node's set; ARGV[2]: where the key hex starts in a chunk
-- name; ARGV[3]: the node's replica names up to the key hex; ARGV[3 + i]: the location
-- KEYS[i] (or the node's replica of it) must still hold.
local n = 0
for i, k in ipairs(KEYS) do
  local hex = string.sub(k, tonumber(ARGV[2]))
  local replica = ARGV[3] .. hex
  if redis.call('GET', k) == ARGV[i + 3] then
    redis.call('DEL', k)
    n = n + 1
  elseif redis.call('GET', replica) == ARGV[i + 3] then
    redis.call('DEL', replica)
    n = n + 1
  end
  redis.call('SREM', ARGV[1], hex)
end
return n
"""

# The device tier's mapping changes in one command (a save's 64 SETs as 64 pipelined commands
# cost more host time than the copies): first delete each of the first ARGV[1] keys only if it
# still holds the value the caller wrote, then set the others with a TTL of ARGV[2] seconds.
_REPLACE_IF_UNCHANGED = """
local n_del = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  if i <= n_del then
    if redis.call('GET', k) == ARGV[i + 2] then
      redis.call('DEL', k)
    end
  else
    redis.call('SET', k, ARGV[i + 2], 'EX', ARGV[2])
  end
end
return n_del
"""


@dataclass(frozen=True)
class ChunkLocation:
    node_id: str
    segment: str
    offset: int
    length: int  # payload bytes; the slot is HEADER_BYTES longer
    checksum: int  # xxh3-64 of the payload

    def encode(self) -> bytes:
        return msgpack.packb(list(astuple(self)))

    @classmethod
    def decode(cls, raw: bytes) -> ChunkLocation:
        node_id, segment, offset, length, digest = msgpack.unpackb(raw)
        return cls(node_id, segment, offset, length, digest)


@dataclass(frozen=True)
class AgentInfo:
    node_id: str
    segment: str
    capacity: int
    address: str  # host:port of the agent's gRPC server (control, and the grpc transport)
    data_address: str = ""  # host:port of its raw TCP slot server (the tcp transport)

    def encode(self) -> bytes:
        return msgpack.packb(list(astuple(self)))

    @classmethod
    def decode(cls, raw: bytes) -> AgentInfo:
        return cls(*msgpack.unpackb(raw))


@dataclass(frozen=True)
class StoreEvent:
    id: str
    op: str  # "stored" | "removed"
    node_id: str
    keys: list[bytes]


def tier_mapping_name(prefix: str, key: bytes) -> str:
    """Where a chunk's device-tier copy is named: ``{prefix}:dt:<key hex>``."""
    return f"{prefix}:dt:{key.hex()}"


def tier_owner_name(prefix: str, owner: str) -> str:
    """Where a device tier's owner record lives: ``{prefix}:dtier:<owner>``."""
    return f"{prefix}:dtier:{owner}"


def replace_if_unchanged(pipe: redis.client.Pipeline[bytes], deletes: Sequence[tuple[str, bytes]],
                         sets: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
    """Queue on ``pipe`` ONE command that deletes each (name, value) of ``deletes`` whose name
    still holds that value, then sets each of ``sets`` with a TTL (an EVAL sent with the
    pipeline, not a SCRIPT LOAD round trip of its own)."""
    pairs = [*deletes, *sets]
    if pairs:
        pipe.eval(_REPLACE_IF_UNCHANGED, len(pairs), *[n for n, _ in pairs], len(deletes), ttl_s,
                  *[v for _, v in pairs])


def redis_password(redis_url: str) -> str | None:
    """The password a Redis URL carries, percent-decoded (None without one)."""
    password = urlsplit(redis_url).password
    return unquote(password) if password else None


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

    def _replica(self, node_id: str, key: bytes) -> str:
        return f"{self.prefix}:r:{node_id}:{key.hex()}"

    def _node_set(self, node_id: str) -> str:
        return f"{self.prefix}:n:{node_id}"

    @property
    def events_stream(self) -> str:
        return f"{self.prefix}:events"

    def _event(self, pipe: redis.client.Pipeline, op: str, node_id: str, keys: list[bytes]) -> None:
        pipe.xadd(
            self.events_stream, {"op": op, "node": node_id, "keys": msgpack.packb(keys)},
            maxlen=EVENTS_MAXLEN, approximate=True,
        )

    # -- chunks ---------------------------------------------------------------------------

    def commit(self, entries: Sequence[tuple[bytes, ChunkLocation]], replica: bool = False) -> None:
        """Publish chunks of one node whose bytes are complete, all or nothing: as their
        committed copies, or (``replica``) as that node's replicas, which leave the committed
        copy where it is. Either is a ``stored`` event of the node."""
        if not entries:
            return
        node = entries[0][1].node_id
        pipe = self.client.pipeline(transaction=True)
        for key, loc in entries:
            pipe.set(self._replica(node, key) if replica else self._chunk(key), loc.encode())
        pipe.sadd(self._node_set(node), *[k.hex() for k, _ in entries])
        pipe.hincrby(f"{self.prefix}:stats", "replicated" if replica else "saved", len(entries))
        self._event(pipe, "stored", node, [k for k, _ in entries])
        pipe.execute()

    def lookup(self, keys: Sequence[bytes], near: str = "") -> list[ChunkLocation | None]:
        """Each chunk's location: with ``near`` (a node id), that node's replica where it has
        one, else the committed copy; both read in the same round trip."""
        if not keys:
            return []
        names = [self._chunk(k) for k in keys]
        if not near:
            return [None if r is None else ChunkLocation.decode(r) for r in self.client.mget(names)]
        raw = self.client.mget(names + [self._replica(near, k) for k in keys])
        n = len(keys)
        return [None if r is None else ChunkLocation.decode(r)
                for r in (raw[n + i] if raw[n + i] is not None else raw[i] for i in range(n))]

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return [loc is not None for loc in self.lookup(keys)]

    def prefix_hits(self, keys: Sequence[bytes]) -> list[ChunkLocation]:
        """Locations of the longest stored prefix of ``keys`` (stops at the first miss)."""
        found: list[ChunkLocation] = []
        for loc in self.lookup(keys):
            if loc is None:
                break
            found.append(loc)
        return found

    def remove(self, entries: Iterable[tuple[bytes, ChunkLocation]], *, counter: str = "evicted") -> int:
        """Drop locations that still point where the caller says; returns how many did."""
        entries = list(entries)
        if not entries:
            return 0
        node = entries[0][1].node_id
        names = [self._chunk(k) for k, _ in entries]
        hex_start = len(self._chunk(b"")) + 1  # Lua strings are 1-based
        args = [self._node_set(node), hex_start, self._replica(node, b"")] + [loc.encode() for _, loc in entries]
        removed = int(self._cad(keys=names, args=args))
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(f"{self.prefix}:stats", counter, removed)
        self._event(pipe, "removed", node, [k for k, _ in entries])
        pipe.execute()
        return removed

    def node_chunks(self, node_id: str) -> list[tuple[bytes, ChunkLocation]]:
        """Every chunk whose committed location, or a replica, is on ``node_id``."""
        keys = self.node_chunk_keys(node_id)
        return [(k, loc) for k, loc in zip(keys, self.lookup(keys, near=node_id), strict=True)
                if loc is not None and loc.node_id == node_id]

    def drop_node(self, node_id: str, keep_segment: str | None = None) -> int:
        """Drop the locations of a node's chunks (all of them, or all but those in
        ``keep_segment``: a restarted agent's fresh segment). Returns how many."""
        stale = [(k, loc) for k, loc in self.node_chunks(node_id) if loc.segment != keep_segment]
        removed = 0
        for i in range(0, len(stale), 1000):
            removed += self.remove(stale[i : i + 1000], counter="dropped")
        if keep_segment is None:
            self.client.delete(self._node_set(node_id))
        return removed

    def clear_chunks(self) -> int:
        """Drop every chunk location (the bytes become unreachable; agents reclaim them)."""
        n = 0
        for pattern in (f"{self.prefix}:c:*", f"{self.prefix}:r:*"):
            for name in self.client.scan_iter(pattern, count=1000):
                n += int(self.client.delete(name))
        for name in self.client.scan_iter(f"{self.prefix}:n:*", count=1000):
            self.client.delete(name)
        return n

    # -- change stream --------------------------------------------------------------------

    def read_events(self, after: str = "0-0", count: int = 1000, block_ms: int | None = None) -> list[StoreEvent]:
        """Store changes after stream id ``after`` ("$" for only new ones when blocking)."""
        reply = self.client.xread({self.events_stream: after}, count=count, block=block_ms)
        events = []
        for _stream, rows in reply or []:
            for ident, fields in rows:
                events.append(StoreEvent(
                    ident.decode(), fields[b"op"].decode(), fields[b"node"].decode(),
                    list(msgpack.unpackb(fields[b"keys"])),
                ))
        return events

    def stream_bounds(self) -> tuple[str, str] | None:
        """(first id, last id) still in the change stream; None if it is empty or absent.
        A consumer whose last id is older than the first one has missed trimmed events."""
        try:
            info = self.client.xinfo_stream(self.events_stream)
        except redis.ResponseError:  # no such key: nothing stored yet
            return None
        first, last = info.get("first-entry"), info.get("last-generated-id")
        if not first:
            return None
        return first[0].decode(), last.decode() if isinstance(last, bytes) else str(last)

    def node_chunk_keys(self, node_id: str) -> list[bytes]:
        """Keys in a node's set (what it may hold: a resync's view, without the locations)."""
        return [bytes.fromhex(h.decode()) for h in self.client.smembers(self._node_set(node_id))]

    # -- counters -------------------------------------------------------------------------

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

    # -- agents ---------------------------------------------------------------------------

    def heartbeat(self, info: AgentInfo, ttl_ms: int) -> bool:
        """Register the agent and renew its liveness; False if it was not alive before
        (first beat, a restarted Redis, or beats missed long enough for the janitor to have
        dropped its chunks): the agent then re-publishes what it holds."""
        pipe = self.client.pipeline(transaction=True)
        pipe.exists(f"{self.prefix}:alive:{info.node_id}")
        pipe.set(f"{self.prefix}:agent:{info.node_id}", info.encode())
        pipe.set(f"{self.prefix}:alive:{info.node_id}", info.segment, px=ttl_ms)
        was_alive, _, _ = pipe.execute()
        return bool(was_alive)

    def unregister_agent(self, node_id: str) -> None:
        self.client.delete(f"{self.prefix}:agent:{node_id}", f"{self.prefix}:alive:{node_id}")

    def agent(self, node_id: str) -> AgentInfo | None:
        raw = self.client.get(f"{self.prefix}:agent:{node_id}")
        return None if raw is None else AgentInfo.decode(raw)

    def agents(self) -> list[AgentInfo]:
        names = list(self.client.scan_iter(f"{self.prefix}:agent:*", count=1000))
        if not names:
            return []
        return [AgentInfo.decode(r) for r in self.client.mget(names) if r is not None]

    def reap_dead_nodes(self) -> dict[str, int]:
        """Drop the chunks and registration of every agent whose liveness key expired (its
        node left, or the agent died). Idempotent, so every live agent may run it."""
        reaped: dict[str, int] = {}
        for info in self.agents():
            if self.client.exists(f"{self.prefix}:alive:{info.node_id}"):
                continue
            reaped[info.node_id] = self.drop_node(info.node_id)
            self.client.delete(f"{self.prefix}:agent:{info.node_id}")
        return reaped
