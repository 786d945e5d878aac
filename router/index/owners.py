"""Which owners (store nodes, engine replicas) hold which chunks: the structure both router
indexes share.

Per chunk key one int, a bitmask over owner slots, in an OrderedDict that keeps LRU order;
owners get slots on first sight and give them back when dropped. Bounded: past
``max_chunks`` the least recently touched chunks are forgotten (a forgotten chunk costs a
missed preference, never a wrong answer: the engines look chunks up themselves).

The request path asks one question, ``prefix_depths``: for each owner, how many leading
chunks of a prompt it holds. It walks the prompt's keys once, AND-ing masks, and notes the
depth at which each owner's bit drops out: O(keys + owners), whatever the index size.

Not thread-safe by itself: an index written from another thread wraps it in a lock
(``StoreIndex``, ``EngineCacheIndex``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class OwnerIndex:
    def __init__(self, max_chunks: int = 1_000_000) -> None:
        self.max_chunks = max_chunks
        self._chunks: OrderedDict[bytes, int] = OrderedDict()  # key -> bitmask of owner slots
        self._slot_of: dict[str, int] = {}
        self._owner_at: list[str | None] = []
        self._forgotten = 0

    def add(self, owner: str, keys: Iterable[bytes]) -> int:
        """Record that ``owner`` holds ``keys``; returns how many it did not hold before."""
        bit = 1 << self._slot(owner)
        chunks = self._chunks
        new = 0
        for key in keys:
            mask = chunks.get(key, 0)
            if not mask & bit:
                new += 1
                chunks[key] = mask | bit
            chunks.move_to_end(key)
        while len(chunks) > self.max_chunks:
            chunks.popitem(last=False)
            self._forgotten += 1
        return new

    def remove(self, owner: str, keys: Iterable[bytes]) -> None:
        slot = self._slot_of.get(owner)
        if slot is None:
            return
        bit = 1 << slot
        for key in keys:
            mask = self._chunks.get(key)
            if mask is None:
                continue
            if mask & ~bit:
                self._chunks[key] = mask & ~bit
            else:
                del self._chunks[key]

    def drop_owner(self, owner: str) -> None:
        """Forget an owner (node left, replica restarted) and free its slot for a new one."""
        slot = self._slot_of.pop(owner, None)
        if slot is None:
            return
        bit = 1 << slot
        for key in [k for k, m in self._chunks.items() if m & bit]:
            mask = self._chunks[key] & ~bit
            if mask:
                self._chunks[key] = mask
            else:
                del self._chunks[key]
        self._owner_at[slot] = None

    def clear(self) -> None:
        self._chunks.clear()
        self._slot_of.clear()
        self._owner_at.clear()

    def _slot(self, owner: str) -> int:
        slot = self._slot_of.get(owner)
        if slot is None:
            free = [i for i, o in enumerate(self._owner_at) if o is None]
            slot = free[0] if free else len(self._owner_at)
            if slot == len(self._owner_at):
                self._owner_at.append(owner)
            else:
                self._owner_at[slot] = owner
            self._slot_of[owner] = slot
        return slot

    def prefix_depths(self, keys: Sequence[bytes]) -> dict[str, int]:
        """For each owner holding at least the first chunk, how many leading chunks of
        ``keys`` it holds contiguously, in order of depth, shallowest first (owners are noted
        as they drop out: the deepest are last, so callers read them without sorting).
        Touches the prompt's first chunk (its root is in use)."""
        chunks, owner_at = self._chunks, self._owner_at
        get = chunks.get
        alive = get(keys[0], 0) if keys else 0
        if not alive:
            return {}
        chunks.move_to_end(keys[0])
        out: dict[str, int] = {}
        depth = 1
        for key in keys[1:]:  # every request walks this: the common step (nobody drops) is one AND
            nxt = alive & get(key, 0)
            if nxt != alive:
                dropped = alive ^ nxt  # nxt is a subset of alive
                while dropped:
                    low = dropped & -dropped
                    out[owner_at[low.bit_length() - 1]] = depth  # type: ignore[index]
                    dropped ^= low
                if not nxt:
                    return out
                alive = nxt
            depth += 1
        while alive:
            low = alive & -alive
            out[owner_at[low.bit_length() - 1]] = depth  # type: ignore[index]
            alive ^= low
        return out

    def prefix_depths_and_any(self, keys: Sequence[bytes]) -> tuple[dict[str, int], int]:
        """``prefix_depths`` and ``any_prefix`` together (the router asks both per request)."""
        depths = self.prefix_depths(keys)
        longest = next(reversed(depths.values()), 0)  # the deepest comes last
        chunks, n = self._chunks, longest
        for key in keys[longest:]:  # past every single owner's run, other owners may go on
            if not chunks.get(key):
                break
            n += 1
        return depths, n

    def any_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading chunks of ``keys`` some owner holds (any mix of owners). Touches
        the first chunk, as ``prefix_depths`` does."""
        n = 0
        for key in keys:
            if not self._chunks.get(key):
                break
            n += 1
        if n:
            self._chunks.move_to_end(keys[0])
        return n

    def holders(self, key: bytes) -> list[str]:
        mask = self._chunks.get(key, 0)
        return [o for o, slot in self._slot_of.items() if mask >> slot & 1]

    def __len__(self) -> int:
        return len(self._chunks)

    def owners(self) -> int:
        return len(self._slot_of)

    def owner_names(self) -> list[str]:
        return list(self._slot_of)

    @property
    def forgotten(self) -> int:
        return self._forgotten
