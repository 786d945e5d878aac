"""Which owners (store nodes, engine replicas) hold which chunks: the structure both router
indexes share.

Per chunk key one int, a bitmask over owner slots, in an OrderedDict that keeps LRU order;
owners get slots on first sight and give them back when dropped. Bounded: past
``max_chunks`` the least recently touched chunks are forgotten (a forgotten chunk costs a
missed preference, never a wrong answer: the engines look chunks up themselves).

Owners come in kinds (``STORE_NODE``, ``ENGINE``; a table of one kind is the plain case):
the router keeps store nodes and engine replicas in ONE table, so the question it asks per
request, how deep into a prompt each node's store and each replica's own cache go, is one
walk with one dict lookup per key. Two tables cost a second lookup per key, and on a
100k-chunk table a lookup is mostly cache misses (bench.router: 7-8 µs against 11-13 µs for
two walks of a 32-chunk prompt at 64 replicas). Each kind keeps its own chunk count, and a
kind can be cleared alone (a store resync does not forget the engines' caches).

The walk is O(keys + owners), whatever the index size: it AND-s the masks along the prompt
and notes the depth at which each owner's bit drops out.

Not thread-safe by itself: indexes written from other threads share one lock with it
(``StoreIndex``, ``EngineCacheIndex``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

STORE_NODE, ENGINE = 0, 1


class OwnerIndex:
    def __init__(self, max_chunks: int = 1_000_000, kinds: int = 1) -> None:
        self.max_chunks = max_chunks
        self._chunks: OrderedDict[bytes, int] = OrderedDict()  # key -> bitmask of owner slots
        self._slot_of: list[dict[str, int]] = [{} for _ in range(kinds)]  # per kind: owner -> slot
        self._owner_at: list[str | None] = []
        self._kind_at: list[int] = []  # slot -> kind
        self._bits = [0] * kinds  # per kind: the mask of its owners' slots
        self._counts = [0] * kinds  # per kind: chunks with at least one owner of that kind
        self._forgotten = 0

    # -- updates ----------------------------------------------------------------------------

    def add(self, owner: str, keys: Iterable[bytes], kind: int = 0) -> int:
        """Record that ``owner`` holds ``keys``; returns how many it did not hold before."""
        bit = 1 << self._slot(owner, kind)
        ours = self._bits[kind]
        chunks = self._chunks
        new = counted = 0
        for key in keys:
            mask = chunks.get(key, 0)
            if not mask & bit:
                new += 1
                counted += not mask & ours
                chunks[key] = mask | bit
            chunks.move_to_end(key)
        self._counts[kind] += counted
        while len(chunks) > self.max_chunks:
            _key, mask = chunks.popitem(last=False)
            self._uncount(mask)
            self._forgotten += 1
        return new

    def remove(self, owner: str, keys: Iterable[bytes], kind: int = 0) -> None:
        slot = self._slot_of[kind].get(owner)
        if slot is None:
            return
        bit, ours, chunks = 1 << slot, self._bits[kind], self._chunks
        for key in keys:
            mask = chunks.get(key, 0)
            if not mask & bit:
                continue
            mask ^= bit
            if not mask & ours:
                self._counts[kind] -= 1
            if mask:
                chunks[key] = mask
            else:
                del chunks[key]

    def drop_owner(self, owner: str, kind: int = 0) -> None:
        """Forget an owner (node left, replica restarted) and free its slot for a new one."""
        slot = self._slot_of[kind].pop(owner, None)
        if slot is None:
            return
        self._strip(1 << slot, kind)
        self._free(slot)

    def clear(self, kind: int | None = None) -> None:
        """Forget everything, or only every owner of ``kind`` (and what they held)."""
        if kind is None:
            self._chunks.clear()
            for slots in self._slot_of:
                slots.clear()
            self._owner_at.clear()
            self._kind_at.clear()
            self._bits = [0] * len(self._bits)
            self._counts = [0] * len(self._counts)
            return
        self._strip(self._bits[kind], kind)
        for slot in self._slot_of[kind].values():
            self._free(slot)
        self._slot_of[kind].clear()

    def _strip(self, bits: int, kind: int) -> None:
        """Take ``bits`` (owners of ``kind``) out of every chunk, dropping emptied chunks."""
        others, chunks = self._bits[kind] & ~bits, self._chunks
        for key in [k for k, m in chunks.items() if m & bits]:
            mask = chunks[key]
            if not mask & others:
                self._counts[kind] -= 1
            mask &= ~bits
            if mask:
                chunks[key] = mask
            else:
                del chunks[key]

    def _uncount(self, mask: int) -> None:
        for kind, bits in enumerate(self._bits):
            if mask & bits:
                self._counts[kind] -= 1

    def _slot(self, owner: str, kind: int) -> int:
        slot = self._slot_of[kind].get(owner)
        if slot is None:
            free = [i for i, o in enumerate(self._owner_at) if o is None]
            slot = free[0] if free else len(self._owner_at)
            if slot == len(self._owner_at):
                self._owner_at.append(owner)
                self._kind_at.append(kind)
            else:
                self._owner_at[slot], self._kind_at[slot] = owner, kind
            self._slot_of[kind][owner] = slot
            self._bits[kind] |= 1 << slot
        return slot

    def _free(self, slot: int) -> None:
        self._owner_at[slot] = None
        self._bits[self._kind_at[slot]] &= ~(1 << slot)

    # -- queries (the request path) ---------------------------------------------------------

    def prefix_depths(self, keys: Sequence[bytes], kind: int = 0) -> dict[str, int]:
        """For each owner of ``kind`` holding at least the first chunk, how many leading
        chunks of ``keys`` it holds contiguously, in order of depth, shallowest first (owners
        are noted as they drop out: the deepest are last, so callers read them without
        sorting). Touches the prompt's first chunk (its root is in use)."""
        return self._walk(keys, self._bits[kind])[kind]

    def prefix_depths_and_any(self, keys: Sequence[bytes], kind: int = 0) -> tuple[dict[str, int], int]:
        """``prefix_depths`` and ``any_prefix`` together (the router asks both per request)."""
        depths = self.prefix_depths(keys, kind)
        return depths, self._any_from(keys, next(reversed(depths.values()), 0), kind)  # the deepest comes last

    def engine_and_store_depths(self, keys: Sequence[bytes]) -> tuple[dict[str, int], dict[str, int], int]:
        """In one walk of a two-kind table: ``prefix_depths`` of the engines, of the store
        nodes, and the store's ``any_prefix`` (what ``kv_aware`` asks per request)."""
        by_kind = self._walk(keys, -1)  # every owner, of either kind
        nodes = by_kind[STORE_NODE]
        return by_kind[ENGINE], nodes, self._any_from(keys, next(reversed(nodes.values()), 0), STORE_NODE)

    def _walk(self, keys: Sequence[bytes], within: int) -> list[dict[str, int]]:
        """``prefix_depths`` of the owners in the mask ``within``, one dict per kind. It
        AND-s the masks along the prompt and notes the depth at which each owner's bit drops
        out (the common step, nobody drops, is one AND)."""
        chunks, owner_at, kind_at = self._chunks, self._owner_at, self._kind_at
        get = chunks.get
        out: list[dict[str, int]] = [{} for _ in self._bits]
        alive = get(keys[0], 0) & within if keys else 0
        if not alive:
            return out
        chunks.move_to_end(keys[0])
        depth = 1
        for key in keys[1:]:  # every request walks this
            nxt = alive & get(key, 0)
            if nxt != alive:
                dropped = alive ^ nxt  # nxt is a subset of alive
                while dropped:
                    low = dropped & -dropped
                    slot = low.bit_length() - 1
                    out[kind_at[slot]][owner_at[slot]] = depth  # type: ignore[index]
                    dropped ^= low
                if not nxt:
                    return out
                alive = nxt
            depth += 1
        while alive:
            low = alive & -alive
            slot = low.bit_length() - 1
            out[kind_at[slot]][owner_at[slot]] = depth  # type: ignore[index]
            alive ^= low
        return out

    def _any_from(self, keys: Sequence[bytes], start: int, kind: int) -> int:
        """How many leading chunks of ``keys`` owners of ``kind`` hold between them, knowing
        the first ``start`` are held (past every single owner's run, others may go on)."""
        get, ours, n = self._chunks.get, self._bits[kind], start
        for key in keys[start:]:
            if not get(key, 0) & ours:
                break
            n += 1
        return n

    def any_prefix(self, keys: Sequence[bytes], kind: int = 0) -> int:
        """How many leading chunks of ``keys`` some owner of ``kind`` holds (any mix of them).
        Touches the first chunk, as ``prefix_depths`` does."""
        n = self._any_from(keys, 0, kind)
        if n:
            self._chunks.move_to_end(keys[0])
        return n

    def holders(self, key: bytes, kind: int = 0) -> list[str]:
        mask = self._chunks.get(key, 0)
        return [o for o, slot in self._slot_of[kind].items() if mask >> slot & 1]

    def __len__(self) -> int:
        """Chunks held by owners of any kind."""
        return len(self._chunks)

    def count(self, kind: int = 0) -> int:
        """Chunks held by at least one owner of ``kind``."""
        return self._counts[kind]

    def owners(self, kind: int = 0) -> int:
        return len(self._slot_of[kind])

    def owner_names(self, kind: int = 0) -> list[str]:
        return list(self._slot_of[kind])

    @property
    def forgotten(self) -> int:
        return self._forgotten
