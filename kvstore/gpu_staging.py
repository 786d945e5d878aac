"""Where a step's chunks lie in the GPU staging buffer, and the one Triton kernel that moves
block rows between the paged KV cache and there (``_copy_rows``).

Apart from ``kvstore/gpu_path.py`` because both the whole-chunk path (``GpuKVPath``) and the
layer-wise save (``kvstore/gpu_layerwise.py``) index staging the same way, and because these
pieces run on CPU under Triton's interpreter in the unit tests. Staging holds chunks back to
back, each laid out as its slot::

    staging: [chunk 0: layer 0 blocks | layer 1 blocks | ...][chunk 1: ...] ...
             row of (chunk c, layer l, block k) = c * layers * n + l * n + k
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from kvstore import segment as seg

_ROW_TILE = 1024  # 8-byte words per program of _copy_rows (8 KiB)
Staged = tuple[int, Sequence[int], int]  # (chunk's index in staging, its block ids, blocks skipped)


@triton.jit  # type: ignore[untyped-decorator]  # Triton types a kernel when it specialises it
def _copy_rows(table, strides, ids, pos, staging, n_ids, layer_rows, row_words,  # type: ignore[no-untyped-def]
               flags, chunk_rows, TO_STAGING: tl.constexpr, TILE: tl.constexpr, FLAGGED: tl.constexpr):
    """Between block ``ids[j]`` of layer ``l`` (a row of ``row_words`` int64 words at address
    ``table[l] + ids[j] * strides[l]`` words) and staging row ``pos[j] + l * layer_rows``;
    one program per (layer, id) and TILE words of its row. FLAGGED: only rows of staged
    chunks whose ``flags[pos[j] // chunk_rows]`` is not 0 are moved (a load's scatter,
    queued before anyone knows which chunks matched their checksums)."""
    r = tl.program_id(0)
    layer = r // n_ids
    j = r % n_ids
    base = tl.load(table + layer).to(tl.pointer_type(tl.int64))
    row = base + tl.load(ids + j) * tl.load(strides + layer)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    at = tl.load(pos + j)
    if FLAGGED:  # a chunk that failed its check is a row of 0 words
        m = cols < tl.where(tl.load(flags + at // chunk_rows) != 0, row_words, 0)
    else:
        m = cols < row_words
    stage = staging + (at + layer * layer_rows) * row_words
    if TO_STAGING:
        tl.store(stage + cols, tl.load(row + cols, mask=m), mask=m)
    else:
        tl.store(row + cols, tl.load(stage + cols, mask=m), mask=m)


def staging_rows(chunks: Sequence[Staged], layers: int, n: int) -> np.ndarray:
    """``_copy_rows``' ``ids`` and ``pos`` for ``chunks`` of ``n`` blocks per layer staged
    back to back, as the rows of one int64 array: block k of staged chunk c, layer 0, is
    staging row c * layers * n + k (the kernel adds l * n for layer l); a chunk's ids start
    at its block ``skip``."""
    ids = np.fromiter(itertools.chain.from_iterable(ids_c for _, ids_c, _ in chunks), np.int64)
    first = np.fromiter((c * layers * n + skip for c, _, skip in chunks), np.int64, len(chunks))
    m = len(chunks[0][1]) if chunks else 0
    if all(len(ids_c) == m for _, ids_c, _ in chunks):  # as many ids each (always, saving)
        return np.stack([ids, (first[:, None] + np.arange(m, dtype=np.int64)).reshape(-1)])
    counts = np.fromiter((len(ids_c) for _, ids_c, _ in chunks), np.int64, len(chunks))
    run_start = np.repeat(np.cumsum(counts) - counts, counts)  # each id's run's first index
    pos = np.repeat(first, counts) + (np.arange(len(ids), dtype=np.int64) - run_start)
    return np.stack([ids, pos])


class Index(NamedTuple):
    """What ``GpuKVPath._index`` uploaded: ``rows`` ids, ``rows`` staging positions, then
    anything appended (a load's expected checksums), in one int64 tensor on the GPU."""

    dev: torch.Tensor
    rows: int

    @property
    def ids(self) -> torch.Tensor:
        return self.dev[: self.rows]

    @property
    def pos(self) -> torch.Tensor:
        return self.dev[self.rows : 2 * self.rows]

    def tail(self, k: int) -> torch.Tensor:
        return self.dev[2 * self.rows : 2 * self.rows + k]


class Slots(NamedTuple):
    """A group's slot payloads and their host addresses, in staging order."""

    views: Sequence[memoryview]
    addrs: list[int]

    def pick(self, idx: Sequence[int]) -> Slots:
        return Slots([self.views[i] for i in idx], [self.addrs[i] for i in idx])


def _hash_block(chunk_bytes: int) -> int | None:
    """The block size at which ONE ``block_digests`` launch over chunks of ``chunk_bytes``
    laid back to back yields every chunk's checksum blocks in order: CHECK_BLOCK when a chunk
    is whole checksum blocks, the chunk itself when it is one (long-input) block; None when
    neither (each chunk is hashed in its own launch)."""
    from kvstore.gpu_xxh3 import KIB_BLOCK

    if chunk_bytes % seg.CHECK_BLOCK == 0:
        return seg.CHECK_BLOCK
    if chunk_bytes < seg.CHECK_BLOCK and chunk_bytes % KIB_BLOCK == 0:
        return chunk_bytes
    return None



def device_runs(srcs: Sequence[torch.Tensor], nbytes: int) -> list[tuple[int, int]]:
    """[a, b) index ranges of ``srcs`` (``nbytes`` each) that lie back to back in one storage:
    one device copy each (a device tier's ring hands a request consecutive slots)."""
    runs: list[tuple[int, int]] = []
    for i, src in enumerate(srcs):
        if runs and _adjacent(srcs[i - 1], src, nbytes):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _adjacent(prev: torch.Tensor, src: torch.Tensor, nbytes: int) -> bool:
    """Whether ``src`` starts where ``prev`` ends, both views of one tensor (cheap checks: a
    request's worth of them runs per load)."""
    base = src._base
    return base is not None and base is prev._base and src.data_ptr() == prev.data_ptr() + nbytes


def _spanning(first: torch.Tensor, nbytes: int) -> torch.Tensor:
    """``nbytes`` (uint8, contiguous) of ``first``'s storage from where ``first`` starts."""
    return first if first.numel() == nbytes else first.as_strided((nbytes,), (1,))


