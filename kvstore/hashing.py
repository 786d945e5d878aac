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
(attention backend / block size) or tensor-parallel rank gives a disjoint key space.
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


def _chain(parent: bytes, chunk_bytes: bytes) -> bytes:
    return hashlib.blake2b(parent + chunk_bytes, digest_size=KEY_BYTES).digest()


def key_hex(key: bytes) -> str:
    return key.hex()
