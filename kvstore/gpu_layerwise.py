"""The save overlapped with the prefill forward (CUDA engines): a step's chunks are gathered and
copied to their slots a group of layers at a time, as the forward finishes them, instead of
all at once after it.

Apart from ``kvstore/gpu_path.py`` (the whole-chunk path it shares its staging, kernel, hash
and slot copies with) because it has a life cycle of its own, one step long, driven by three
vLLM hooks::

    first save_kv_layer --> slots placed (StoreClient.place), LayerwiseSave: ids uploaded
    save_kv_layer(l)    --> when l completes its group of layers (FLUSHES groups a step): the
                            side stream waits for the compute stream, then ONE gather launch
                            of the group's rows of every chunk into staging and one pitched
                            D2H per run of slots (usually one) of that part
    wait_for_save       --> every layer seen: hash staging (one launch), wait once, seal
                            and commit (StoreClient.finish); else the whole-chunk path into
                            the same slots; a failed step: abort the slots

A chunk's bytes are layer-major, so layers a..b-1 of chunk c are ONE run in both places::

    staging: [c0: L0 | L1 | ... ][c1: L0 | L1 | ...] ...     (chunk bytes cb = L * n * row)
    slot c:  [hdr][L0 | L1 | ...]                             layer l at l * n * row
    a flush: cudaMemcpy2DAsync(width (b-a) * n * row, rows = chunks, dev pitch cb, host pitch slot)

The checksums are over each chunk's whole bytes, taken from staging after the last layer:
the same keys, bytes and checksums as ``GpuKVPath.extract_many``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from kvstore.gpu_host import _pitched_runs
from kvstore.gpu_staging import _ROW_TILE

if TYPE_CHECKING:
    from kvstore.gpu_path import GpuKVPath

MAX_RUNS = 4  # pitched runs of slots a step may have (one D2H each per flush); more: whole-chunk path
# Flushes per step: the layers go out in this many groups of consecutive layers, each ONE gather
# launch and one D2H per run of slots (layers a..b-1 of a chunk are one run too). Each flush
# costs ~0.3 ms of host time inside the forward (bench/gpu/overlap.py: a Triton launch, a
# stream wait, the copies' calls); the last group's copy is what the forward cannot hide.
FLUSHES = 4
_U64 = (1 << 64) - 1


class LayerwiseUnavailable(Exception):
    """This step cannot be saved layer by layer (the caller takes the whole-chunk path)."""


class LayerwiseSave:
    """One step's chunks, written into their (placed) payloads layer by layer on the path's
    side stream; ``finish`` hashes them and waits; ``cancel`` waits and forgets them."""

    def __init__(self, path: GpuKVPath, block_ids: Sequence[Sequence[int]], payloads: Sequence[memoryview],
                 group_bytes: int, flushes: int = 0) -> None:
        if not (path.gpu_checksums and path.fused_copies and path.pitched_copies):
            raise LayerwiseUnavailable("needs GPU checksums, the one-launch gather and pitched copies")
        if not payloads or len(block_ids) != len(payloads):
            raise LayerwiseUnavailable(f"{len(block_ids)} block lists for {len(payloads)} payloads")
        n = len(block_ids[0])
        if any(len(ids) != n for ids in block_ids):
            raise LayerwiseUnavailable("the chunks of one save must all hold the same number of blocks")
        path._check_sizes(payloads, n)
        self.path, self.n, self.n_chunks = path, n, len(payloads)
        self.cb = len(payloads[0])
        if self.n_chunks * self.cb > group_bytes:
            raise LayerwiseUnavailable(f"{self.n_chunks * self.cb} B of chunks is over one staging group")
        slots = path._slots(payloads)
        self.runs = _pitched_runs(slots.addrs, self.cb)
        if len(self.runs) > MAX_RUNS:
            raise LayerwiseUnavailable(f"slots in {len(self.runs)} runs")
        self.addrs = slots.addrs
        self.layers = len(path.blocks)
        self.seen = [False] * self.layers
        self.per = -(-self.layers // max(1, min(flushes or FLUSHES, self.layers)))  # layers per flush
        self.gathered = torch.cuda.Event()
        with torch.cuda.stream(path.stream):  # staging (re)allocated and the ids uploaded on the side stream
            self.flat = path._stage(self.n_chunks * self.cb)
            self.index = path._index([(c, ids, 0) for c, ids in enumerate(block_ids)], n)
        self.open = True

    @property
    def complete(self) -> bool:
        return all(self.seen)

    def layer(self, i: int) -> None:
        """Layer ``i`` of this step is written; once every layer of its group is, queue the
        group's part of every chunk (``_flush``)."""
        self.seen[i] = True
        first = i - i % self.per
        last = min(first + self.per, self.layers)
        if all(self.seen[first:last]):
            self._flush(first, last)

    def _flush(self, first: int, last: int) -> None:
        """Layers ``first``..``last - 1`` of every chunk: the side stream waits for what the
        compute stream queued so far (their KV writes), then ONE gather launch and one D2H per
        run of slots (those layers of a chunk are one run in staging and in its slot)."""
        path, n = self.path, self.n
        rb = path.row_bytes
        words = rb // 8
        side = path.stream
        side.wait_stream(torch.cuda.current_stream(path.device))
        at = first * n * rb  # the group's offset in a chunk, in staging and in its slot
        staging = self.flat.view(torch.int64)[at // 8 :]
        grid = ((last - first) * self.index.rows, -(-words // _ROW_TILE))
        ids = self.index.ids
        path._copy_rows(side, grid, path._table[first:], path._strides[first:], ids, self.index.pos, staging,
                        self.index.rows, n, words, ids, self.layers * n, True, False)
        self.gathered.record(side)
        dev = self.flat.data_ptr() + at
        width = (last - first) * n * rb
        for a, b, pitch in self.runs:
            if not path._copy_2d(self.addrs[a] + at, dev + a * self.cb, width, b - a, pitch, to_host=True,
                                 dev_pitch=self.cb):
                raise RuntimeError("a pitched layer copy was refused")

    def finish(self, on_staged: Callable[[torch.Tensor, int, int], None] | None = None) -> list[int]:
        """Every layer seen: hash the staged chunks (their whole bytes, one launch), let
        ``on_staged(flat, n_chunks, chunk_bytes)`` queue more on the side stream while staging
        holds them (the device tier's copies), wait once; each payload's checksum."""
        if not self.complete:
            raise LayerwiseUnavailable(f"layers {[i for i, s in enumerate(self.seen) if not s]} not seen")
        path = self.path
        try:
            sums, _ = path._hash_async(self.flat, self.n_chunks, after=self.gathered)
            with torch.cuda.stream(path.hash_stream):
                host = path._to_host(sums)
            if on_staged is not None:
                with torch.cuda.stream(path.stream):
                    on_staged(self.flat, self.n_chunks, self.cb)
        finally:
            self.cancel()  # waits: the D2H has landed, the hash is read
        return [v & _U64 for v in host.tolist()]

    def cancel(self) -> None:
        """Wait until nothing queued still writes a slot or reads staging (before the slots
        are aborted, or another save reuses staging)."""
        if self.open:
            self.open = False
            self.path.stream.synchronize()
            self.path.hash_stream.synchronize()
