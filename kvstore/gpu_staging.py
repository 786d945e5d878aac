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
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from kvstore import segment as seg
from kvstore.logging import get_logger

log = get_logger(__name__)

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


class CopyRows:
    """``_copy_rows`` on an explicit stream, through the kernel Triton compiled for this kind
    of arguments.

    ``_copy_rows[grid](...)`` goes through ``JITFunction.run`` on every call (bind the
    arguments, specialise them, look the kernel up: 18-47 us of host time on the H200
    machines, ``tools/gpu/launch-cost.py``) and launches on torch's current stream, so the KV
    path entered ``torch.cuda.stream(side)`` around it (~19 us more). A save's D2H cannot
    start before its gather is queued: both sat on the save's critical path, and on every
    layer-wise flush. Here the kernel ``JITFunction.run`` returned is kept under exactly what
    Triton specialises this kernel's arguments on (an int: whether it is 1, a multiple of 16,
    past 32 bits; a pointer: whether it is 16-byte aligned; the flags' dtype and the
    constexprs) and later launched through its own launcher, which takes the stream (~9 us).
    A new kind of arguments goes through ``JITFunction.run`` once, on that stream, and is
    not kept while a Triton launch hook is set (a profiler sees those launches). A refusal of
    the launcher (another Triton's signature) turns this off for good, and so do Triton's
    interpreter and ``PDSERVE_TRITON_JIT_LAUNCH=1``: then every launch goes through
    ``JITFunction.run``."""

    def __init__(self) -> None:
        self._kernels: dict[tuple[Any, ...], Any] = {}
        self.direct = os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("PDSERVE_TRITON_JIT_LAUNCH") != "1"
        self.launches = {"direct": 0, "jit": 0}

    def __call__(self, stream: torch.cuda.Stream, grid: tuple[int, int], table: torch.Tensor, strides: torch.Tensor,
                 ids: torch.Tensor, pos: torch.Tensor, staging: torch.Tensor, n_ids: int, layer_rows: int,
                 row_words: int, flags: torch.Tensor, chunk_rows: int, to_staging: bool, flagged: bool) -> None:
        """``_copy_rows[grid](...)`` (its arguments in its order, the constexprs by value) on
        ``stream``."""
        key: tuple[Any, ...] = ()
        if self.direct:
            key = (to_staging, flagged, flags.dtype, table.data_ptr() % 16, strides.data_ptr() % 16,
                   ids.data_ptr() % 16, pos.data_ptr() % 16, staging.data_ptr() % 16, flags.data_ptr() % 16,
                   _int_kind(n_ids), _int_kind(layer_rows), _int_kind(row_words), _int_kind(chunk_rows))
            kernel = self._kernels.get(key)
            if kernel is not None:
                try:
                    kernel.run(grid[0], grid[1], 1, stream.cuda_stream, kernel.function, kernel.packed_metadata,
                               None, None, None, table, strides, ids, pos, staging, n_ids, layer_rows, row_words,
                               flags, chunk_rows, to_staging, _ROW_TILE, flagged)
                    self.launches["direct"] += 1
                    return
                except TypeError as e:  # the launcher checks its arguments before it queues anything
                    log.warning("Triton's compiled launcher takes other arguments here (%s): KV copies launch "
                                "through JITFunction.run", e)
                    self.direct = False
        with torch.cuda.stream(stream):
            kernel = _copy_rows[grid](table, strides, ids, pos, staging, n_ids, layer_rows, row_words, flags,
                                      chunk_rows, TO_STAGING=to_staging, TILE=_ROW_TILE, FLAGGED=flagged)
        self.launches["jit"] += 1
        if self.direct and hasattr(kernel, "run") and hasattr(kernel, "packed_metadata") and not _launch_hooked():
            self._kernels[key] = kernel


def _int_kind(v: int) -> tuple[bool, bool, bool]:
    """What Triton specialises an int argument on: 1 (a constant), a multiple of 16, 32 bits."""
    return v == 1, v % 16 == 0, -(2**31) <= v < 2**31


def _launch_hooked() -> bool:
    """Whether a Triton launch hook is set (a profiler): it must see every launch."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    hooks = (getattr(runtime, "launch_enter_hook", None), getattr(runtime, "launch_exit_hook", None))
    return any(h is not None and getattr(h, "calls", True) != [] for h in hooks)  # newer Tritons: a chain, empty


def staging_rows(chunks: Sequence[Staged], layers: int, n: int) -> np.ndarray:
    """``_copy_rows``' ``ids`` and ``pos`` for ``chunks`` of ``n`` blocks per layer staged
    back to back, as the rows of one int64 array: block k of staged chunk c, layer 0, is
    staging row c * layers * n + k (the kernel adds l * n for layer l); a chunk's ids start
    at its block ``skip``."""
    total = sum(len(ids_c) for _, ids_c, _ in chunks)
    out = np.empty(2 * total, np.int64)
    staging_rows_into(chunks, layers, n, out)
    return out.reshape(2, total)


def staging_rows_into(chunks: Sequence[Staged], layers: int, n: int, out: np.ndarray) -> int:
    """``staging_rows`` written straight into ``out`` (the ids, then the positions: a
    request's index is built in the pinned buffer it is uploaded from); returns the number
    of ids."""
    ids = np.fromiter(itertools.chain.from_iterable(ids_c for _, ids_c, _ in chunks), np.int64)
    rows = ids.size
    out[:rows] = ids
    first = np.fromiter((c * layers * n + skip for c, _, skip in chunks), np.int64, len(chunks))
    m = len(chunks[0][1]) if chunks else 0
    if all(len(ids_c) == m for _, ids_c, _ in chunks):  # as many ids each (always, saving)
        pos = out[rows : 2 * rows].reshape(len(chunks), m)
        pos[:] = np.arange(m, dtype=np.int64)
        pos += first[:, None]
        return rows
    counts = np.fromiter((len(ids_c) for _, ids_c, _ in chunks), np.int64, len(chunks))
    run_start = np.repeat(np.cumsum(counts) - counts, counts)  # each id's run's first index
    out[rows : 2 * rows] = np.repeat(first, counts) + (np.arange(rows, dtype=np.int64) - run_start)
    return rows


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


