"""Content-addressed chunk keys over token ids.

One function, used by both the router (to ask "who holds this prompt's prefix?") and the
KV connector inside the engines (to save and load blocks), so the two can never disagree.

A chunk is ``chunk_tokens`` consecutive prompt tokens (a multiple of the engine's KV block
size). Its key chains its parent's key, so a key names the whole prefix up to and including
the chunk, not just the chunk's own tokens:

    seed = H(namespace)
    key_0 = H(seed  || tokens[0:C])
    key_1 = H(key_0 || tokens[C:2C])
    ...

Only full chunks get keys: a trailing partial chunk is always recomputed.

The namespace keeps KV that is not interchangeable apart: another model, dtype, KV layout
(attention backend / block size) or chunk size gives a disjoint key space.

Tensor parallelism: each rank of a TP engine holds its own shard of every block (its KV
heads), stored as its own chunk. The chain above is rank 0's and is the chunk's identity
(the router's index and the store's events speak of it); rank r's key is derived from it:

    shard key(rank 0)      = key_i                      (byte-identical to a TP=1 key)
    shard key(rank r > 0)  = H(key_i || msgpack(["tp", r, tp_size]))

The TP size is in the derived keys because with replicated KV heads (tp_size > heads) two
TP sizes give one rank index different heads of the same byte size. Rank 0 of every TP size
starts at head 0: its shard equals a TP=1 chunk wherever its size does, and a different
size fails the connector's size check (recompute), never a wrong token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

KEY_BYTES = 16


@dataclass(frozen=True)
class KVNamespace:
    """Everything that makes two engines' KV bytes for the same tokens differ."""

    model: str
    dtype: str
    layout: str
    # Part of the seed since the first keys were stored; engines keep it at 0 and derive the
    # other TP ranks' keys with ``rank_key`` (which also carries the TP size).
    tp_rank: int = 0
    chunk_tokens: int = 32

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.tp_rank < 0:
            raise ValueError(f"tp_rank must be >= 0, got {self.tp_rank}")

    def seed(self) -> bytes:
        fields = [self.model, self.dtype, self.layout, self.tp_rank, self.chunk_tokens]
        return hashlib.blake2b(msgpack.packb(fields), digest_size=KEY_BYTES).digest()


def chunk_keys(namespace: KVNamespace, token_ids: Sequence[int]) -> list[bytes]:
    """Chained keys of every full chunk of ``token_ids``, in prompt order."""
    size = namespace.chunk_tokens
    n_full = len(token_ids) // size
    if n_full == 0:
        return []
    # One conversion to fixed-width little-endian bytes, then slices: cheap even for long
    # prompts, and independent of how the caller holds the ids (list, array, tuple).
    raw = np.asarray(token_ids[: n_full * size], dtype="<u4").tobytes()
    width = size * 4
    keys: list[bytes] = []
    parent = namespace.seed()
    for i in range(n_full):
        parent = _chain(parent, raw[i * width : (i + 1) * width])
        keys.append(parent)
    return keys


def next_key(namespace: KVNamespace, parent: bytes | None, chunk: Sequence[int]) -> bytes:
    """The key of one full chunk after ``parent`` (None: the prompt's first chunk); equal to
    the matching element of ``chunk_keys`` over the whole prompt. For callers that see a
    prompt chunk by chunk (the router's view of engine KV events)."""
    if len(chunk) != namespace.chunk_tokens:
        raise ValueError(f"a chunk is {namespace.chunk_tokens} tokens, got {len(chunk)}")
    return _chain(namespace.seed() if parent is None else parent, np.asarray(chunk, dtype="<u4").tobytes())


def rank_key(key: bytes, tp_rank: int, tp_size: int) -> bytes:
    """Tensor-parallel rank ``tp_rank``'s key for the chunk whose rank-0 key is ``key``
    (see the module doc): ``key`` itself for rank 0, so TP=1 keys never change."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
    if tp_rank == 0:
        return key
    return hashlib.blake2b(key + msgpack.packb(["tp", tp_rank, tp_size]), digest_size=KEY_BYTES).digest()


def rank_keys(keys: Sequence[bytes], tp_size: int) -> list[list[bytes]]:
    """Every rank's keys for rank 0's ``keys``: ``[rank][chunk]``."""
    return [list(keys)] + [[rank_key(k, r, tp_size) for k in keys] for r in range(1, tp_size)]


def _chain(parent: bytes, chunk_bytes: bytes) -> bytes:
    return hashlib.blake2b(parent + chunk_bytes, digest_size=KEY_BYTES).digest()


def key_hex(key: bytes) -> str:
    return key.hex()
