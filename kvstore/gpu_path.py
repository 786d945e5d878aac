"""The connector's KV copies when the engine's cache is on a CUDA device (imported only then).

What it does differently from the generic path in ``kvstore/connector.py`` (same bytes, same
slot layout, same checksums):

- the store segment's mapping is registered with CUDA as pinned host memory once per process
  (``cudaHostRegister``), so copies between the GPU and a slot run at DMA speed instead of
  through the driver's pageable bounce buffers (~55 against ~15 GB/s on an H200);
- a request's chunks are handled together (``extract_many`` / ``load_many``, called once
  per request through ``StoreClient.batch_put_all`` / ``batch_get_self_verified``): their
  blocks of every layer are gathered on the GPU into one staging tensor laid out as the
  slots are, and scattered back from one, in ONE launch for all layers and chunks
  (``_copy_rows``, through a table of the layers' base addresses and a per-block staging
  position), and their stream synchronisations are paid once (a launch, an id upload and a
  wait cost ~100-150 us of host time: more than a 4 MiB copy). Caches whose block rows are
  not contiguous 8-byte-aligned runs keep the per-layer ops;
- checksums are taken on the GPU (``kvstore/gpu_xxh3.py``: the same xxh3-64 per
  ``CHECK_BLOCK``, bit for bit), one launch over all the staged chunks, never by the host:

      save:  gather -> staging --D2H (one pitched copy, queued)-------------------> slots
                          `--xxh3 per block, fold per chunk (other stream)--> checksums --> seals
      load:  slots --H2D (one pitched copy)--> staging --xxh3--> fold, compare with each slot's
             checksum --> match flags --> ONE scatter that skips the chunks flagged 0;
             the flags go to the host, which waits once, at the end

  A slot's payload follows its header, so a run of slots is never one contiguous payload;
  but the allocator lays a request's slots out back to back, at one pitch, so ONE
  ``cudaMemcpy2DAsync`` (rows of a payload, the slot pitch apart on the host) moves them
  all. Slots that are not at one pitch go one ``copy_`` each (~5 us of host time and a
  gap between DMA transfers each). Everything a load does after its copies is queued before
  they land, so no host round trip sits between the hash and the scatter.
  ``extract_many`` returns the payloads' checksums for the client to seal with;
  ``load_many`` is ``StoreClient.batch_get_self_verified``'s check: it runs while the slots
  are pinned and says which copies matched.

If the kernels fail their self-check against xxhash at start (``GpuKVPath.gpu_checksums`` is
then False), the checksums stay on the host: ``extract`` returns None (the client hashes the
slot) and loads go through the client's verified read and ``inject``, as do chunks read
from another node (verified by the client as they land: hashing them again would be waste).

A payload that is not in a mapped segment (a staging buffer shipped to another node) is copied
the same way, unpinned: still correct, just slower.

The CUDA path's modules (all imported only where the cache is on CUDA, but ``gpu_step``):

    gpu_path.py       GpuKVPath: a request's whole chunks out (extract_many) and in (load_many),
                      the device tier's copies; the staging buffer and the streams
    gpu_staging.py    where chunks lie in staging, and the one-launch gather/scatter kernel
    gpu_host.py       segments pinned with CUDA, slots as addresses, pitched slot copies
    gpu_layerwise.py  the save overlapped with the forward: a step's chunks, group of layers
                      by group of layers, from save_kv_layer
    gpu_step.py       the connector's per-step state for it (imported on every engine)
    gpu_xxh3.py       the checksums on the GPU
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import triton

from kvstore import segment as seg
from kvstore.gpu_host import (  # noqa: F401  (REGISTRY, HostRegistry: re-exported for the tools)
    _H2D,
    REGISTRY,
    HostRegistry,
    SlotCopies,
    Slots,
    _clear_last_cuda_error,
    _memcpy_2d_async,
    _pitched_runs,
)
from kvstore.gpu_staging import (  # noqa: F401  (re-exported: the tests and tools import them from here)
    _ROW_TILE,
    CopyRows,
    Index,
    Staged,
    _copy_rows,
    _hash_block,
    _spanning,
    device_runs,
    staging_rows,
    staging_rows_into,
)
from kvstore.logging import get_logger

log = get_logger(__name__)

_U64 = (1 << 64) - 1
# GPU staging per step of a request's save or load: its chunks go in runs of at most this
# many bytes (a 2k-token prompt of a 1B model is 64 MiB: one run; very long ones take a few).
GROUP_BYTES = 256 << 20


def _gpu_checksums_work(device: torch.device) -> bool:
    """Whether kvstore.gpu_xxh3 imports and agrees with segment.block_digest here (a short
    and a multi-block probe); logged and False if not."""
    try:
        from kvstore import gpu_xxh3

        for n in (3000, seg.CHECK_BLOCK + 333):
            probe = os.urandom(n)
            t = torch.frombuffer(bytearray(probe), dtype=torch.uint8).to(device)
            digests = gpu_xxh3.block_digests(t)
            want = seg.checksum(probe)
            expected = torch.tensor([want - (1 << 64) if want >> 63 else want, 0], dtype=torch.int64, device=device)
            sums, flags = gpu_xxh3.chunk_checksums(torch.cat([digests, digests]), 2, expected)
            if (gpu_xxh3.as_unsigned(digests) != [seg.block_digest(probe[a:b]) for a, b in seg.check_blocks(n)]
                    or gpu_xxh3.as_unsigned(sums) != [want, want] or flags is None or flags.tolist() != [1, 0]):
                log.warning("GPU xxh3 disagrees with xxhash: checksums stay on the host")
                return False
        return True
    except Exception as e:
        log.warning("GPU xxh3 unavailable, checksums stay on the host: %s: %s", type(e).__name__, e)
        return False


class GpuKVPath(SlotCopies):
    """Gather/scatter of whole chunks between paged CUDA KV blocks and slot payloads, a
    request's chunks at a time (``extract_many``, ``load_many``): one gather or scatter
    launch, one hash launch and one host synchronisation per request (per ``GROUP_BYTES``
    of it), whatever its number of chunks. Staging holds the chunks back to back, each laid
    out as its slot::

        staging: [chunk 0: layer 0 blocks | layer 1 blocks | ...][chunk 1: ...] ...
                 row of (chunk c, layer l, block k) = c * layers * n + l * n + k
    """

    def __init__(self, blocks: list[torch.Tensor]) -> None:
        self.blocks = blocks
        ref = blocks[0]
        self.device = ref.device
        self.dtype = ref.dtype
        self.row_shape = tuple(ref.shape[1:])
        self.row_bytes = ref[0].numel() * ref.element_size()
        self.stream = torch.cuda.Stream(device=self.device)  # gather/scatter and the bulk copies
        self.hash_stream = torch.cuda.Stream(device=self.device)  # checksums beside the D2H
        self.registry = REGISTRY
        self._staging = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._results_host = torch.empty(0, dtype=torch.int64, pin_memory=True)
        # _index's pinned source, reused once the last upload from it is done
        self._index_host = torch.empty(0, dtype=torch.int64, pin_memory=True)
        self._index_np = self._index_host.numpy()
        self._uploaded = torch.cuda.Event()
        self._index_side_dev = torch.empty(0, dtype=torch.int64, device=self.device)  # the side stream's alone
        self._copy_rows = CopyRows()
        self.gpu_checksums = _gpu_checksums_work(self.device)
        words = [r.stride(0) * r.element_size() // 8 for r in blocks]
        self._table = torch.tensor([r.data_ptr() for r in blocks], dtype=torch.int64, device=self.device)
        self._strides = torch.tensor(words, dtype=torch.int64, device=self.device)
        self.fused_copies = self._fused_copies_work()
        self.pitched_copies = False
        self.pitched_copies = self._pitched_copies_work()
        # A load compares its checksums on the GPU and queues the scatter behind the compare
        # (no host round trip in between); False makes the host read the verdicts first, as
        # per-layer caches must (the benchmark times both).
        self.device_verdicts = True
        log.info("GPU KV path: checksums on the GPU %s, one-launch gather/scatter %s, pitched slot copies %s",
                 self.gpu_checksums, self.fused_copies, self.pitched_copies)

    def _fused_copies_work(self) -> bool:
        """Whether every layer's block rows are contiguous, 8-byte-aligned runs (so
        ``_copy_rows`` can move them as words) and a gather + scatter back of a few blocks
        through it agrees with ``index_select`` (the scatter rewrites the same bytes)."""
        for r in self.blocks:
            if not r[0].is_contiguous() or r.data_ptr() % 8 or (r.stride(0) * r.element_size()) % 8:
                return False
        if self.row_bytes % 8:
            return False
        try:
            n = min(4, self.blocks[0].shape[0])
            ids = list(range(n - 1, -1, -1))
            chunks = [(0, ids, 0)]
            with torch.cuda.stream(self.stream):
                flat = self._stage(n * len(self.blocks) * self.row_bytes)
                idt = torch.tensor(ids, dtype=torch.long, device=self.device)
                want = torch.stack([torch.index_select(r, 0, idt) for r in self.blocks]).reshape(-1).view(torch.uint8)
                same = True
                for _ in range(2):  # the second launch of a kind goes through its compiled launcher
                    flat.zero_()
                    self._launch(chunks, flat, n, to_staging=True)
                    same = same and torch.equal(flat, want)  # bytes: NaN == NaN here
                    self._launch(chunks, flat, n, to_staging=False)
            self.stream.synchronize()
            if not same:
                log.warning("the one-launch KV gather disagrees with index_select: per-layer copies")
            return same
        except Exception as e:
            log.warning("the one-launch KV gather is unavailable (%s: %s): per-layer copies", type(e).__name__, e)
            return False

    # -- the copies ------------------------------------------------------------------------

    def _index(self, chunks: Sequence[Staged], n: int, checksums: Sequence[int] = ()) -> Index:
        """``_copy_rows``' ids and positions for ``chunks``, then ``checksums`` (as int64 bit
        patterns), on the GPU: built with numpy into pinned memory and ONE H2D queued on the
        current stream (torch.tensor of Python lists, or a fresh pinned tensor, cost tens of us
        of host time more per request)."""
        size, rows = self._index_rows(chunks, n, checksums)
        dev = self._index_host[:size].to(self.device, non_blocking=True)
        self._uploaded.record()
        return Index(dev, rows)

    def _index_rows(self, chunks: Sequence[Staged], n: int, checksums: Sequence[int]) -> tuple[int, int]:
        """``_index``'s values written into the pinned buffer (once its last upload has left
        it, long since); how many values, and how many ids."""
        size = 2 * sum(len(ids_c) for _, ids_c, _ in chunks) + len(checksums)
        self._uploaded.synchronize()
        if self._index_np.size < size:
            self._index_host = torch.empty(max(size, 2 * self._index_np.size), dtype=torch.int64, pin_memory=True)
            self._index_np = self._index_host.numpy()
        rows = staging_rows_into(chunks, len(self.blocks), n, self._index_np)
        if checksums:
            self._index_np[2 * rows : size] = np.array(checksums, dtype=np.uint64).view(np.int64)
        return size, rows

    def _index_side(self, chunks: Sequence[Staged], n: int) -> Index:
        """``_index`` for a copy on the side stream, without entering it (~19 us of host time
        a ``torch.cuda.stream``): ONE cudaMemcpyAsync on the side stream into a device buffer
        that only the side stream's work reads, so each upload is ordered after the copies
        that read the last one."""
        size, rows = self._index_rows(chunks, n, ())
        if self._index_side_dev.numel() < size:
            with torch.cuda.stream(self.stream):  # allocated (and the old one freed) on the side stream
                self._index_side_dev = torch.empty(max(size, 2 * self._index_side_dev.numel()), dtype=torch.int64,
                                                   device=self.device)
        dev = self._index_side_dev[:size]
        fn = _memcpy_2d_async()
        host = self._index_host
        if fn is None or fn(dev.data_ptr(), 8 * size, host.data_ptr(), 8 * size, 8 * size, 1, _H2D,
                            self.stream.cuda_stream) != 0:
            if fn is not None:
                _clear_last_cuda_error()
            with torch.cuda.stream(self.stream):
                dev.copy_(host[:size], non_blocking=True)
        self._uploaded.record(self.stream)
        return Index(dev, rows)

    def _launch(self, chunks: Sequence[Staged], flat: torch.Tensor, n: int, to_staging: bool,
                index: Index | None = None, flags: torch.Tensor | None = None) -> None:
        """One ``_copy_rows`` launch, on the side stream, for every layer of every chunk:
        ``(c, ids, skip)`` moves staged chunk c's blocks skip.. to or from blocks ``ids``
        (``index``: their ``_index``, uploaded beforehand); with ``flags`` (one per staged
        chunk, on the GPU) only the chunks whose flag is not 0."""
        index = index if index is not None else self._index_side(chunks, n)
        if not index.rows:
            return
        words = self.row_bytes // 8
        grid = (len(self.blocks) * index.rows, triton.cdiv(words, _ROW_TILE))
        ids = index.ids
        self._copy_rows(self.stream, grid, self._table, self._strides, ids, index.pos, flat.view(torch.int64),
                        index.rows, n, words, ids if flags is None else flags, len(self.blocks) * n, to_staging,
                        flags is not None)

    def _rows(self, chunks: Sequence[Staged], flat: torch.Tensor, n: int, to_staging: bool,
              index: Index | None = None, flags: torch.Tensor | None = None) -> None:
        """Gather (``to_staging``) or scatter ``chunks`` on the side stream: one launch, or
        per-layer ops where the rows are not word runs (these never take ``flags``)."""
        if self.fused_copies:
            self._launch(chunks, flat, n, to_staging, index, flags)
            return
        with torch.cuda.stream(self.stream):
            view = flat.view(self.dtype).view(-1, len(self.blocks), n, *self.row_shape)
            for c, ids_c, skip in chunks:
                idt = torch.tensor(list(ids_c), dtype=torch.long).to(self.device, non_blocking=True)
                for layer, rows in enumerate(self.blocks):
                    if to_staging:
                        torch.index_select(rows, 0, idt, out=view[c, layer])
                    else:
                        rows.index_copy_(0, idt, view[c, layer, skip:])

    def _stage(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of the GPU staging area (grown on the side stream)."""
        if self._staging.numel() < nbytes:
            with torch.cuda.stream(self.stream):
                self._staging = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._staging[:nbytes]

    def _check_sizes(self, payloads: Sequence[memoryview], n_blocks: int) -> None:
        nbytes = len(self.blocks) * n_blocks * self.row_bytes
        for payload in payloads:
            if len(payload) != nbytes:
                raise ValueError(f"chunk holds {len(payload)} B, this engine expects {nbytes}")


    def _hash_async(self, flat: torch.Tensor, n_chunks: int, after: torch.cuda.Event | None = None,
                    expected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Enqueue on the hash stream (after ``after``, else after what the side stream has
        enqueued so far) the xxh3 of every checksum block of the ``n_chunks`` equal chunks in
        ``flat`` and each chunk's checksum from them (``gpu_xxh3.chunk_checksums``; with
        ``expected``, also its match flag); both stay on the GPU."""
        from kvstore import gpu_xxh3

        h = self.hash_stream
        if after is not None:
            h.wait_event(after)
        else:
            h.wait_stream(self.stream)
        cb = flat.numel() // n_chunks
        with torch.cuda.stream(h):
            block = _hash_block(cb)
            if block is not None:  # one launch: its blocks are the chunks' checksum blocks, in order
                digests = gpu_xxh3.block_digests(flat, block)
            else:
                digests = torch.cat([gpu_xxh3.block_digests(flat[c * cb : (c + 1) * cb]) for c in range(n_chunks)])
            return gpu_xxh3.chunk_checksums(digests, n_chunks, expected)

    def _to_host(self, values: torch.Tensor) -> torch.Tensor:
        """Queue the copy of ``values`` (int64, on the GPU) into pinned memory on the current
        stream; read it once that stream is synchronised (the buffer is reused per call)."""
        if self._results_host.numel() < values.numel():
            self._results_host = torch.empty(values.numel(), dtype=torch.int64, pin_memory=True)
        host = self._results_host[: values.numel()]
        host.copy_(values, non_blocking=True)
        return host

    # -- a request's chunks ----------------------------------------------------------------

    def extract_many(self, block_ids: Sequence[Sequence[int]], payloads: Sequence[memoryview]) -> list[int | None]:
        """Write chunk c's blocks ``block_ids[c]`` of every layer into ``payloads[c]``
        (layer-major, as ``_chunk_view``); returns each payload's checksum
        (``segment.checksum``), taken on the GPU, or None where the host must take it."""
        if len(block_ids) != len(payloads):
            raise ValueError(f"{len(block_ids)} block lists for {len(payloads)} payloads")
        if not payloads:
            return []
        n = len(block_ids[0])
        if any(len(ids) != n for ids in block_ids):
            raise ValueError("the chunks of one save must all hold the same number of blocks")
        self._check_sizes(payloads, n)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the forward wrote these blocks
        out: list[int | None] = []
        try:
            for g in _groups(len(payloads), len(payloads[0])):
                out += self._extract_group([block_ids[c] for c in g], [payloads[c] for c in g], n)
        except BaseException:
            self.stream.synchronize()  # no copy may still write a slot once the caller aborts it
            raise
        return out

    def _extract_group(self, block_ids: list[Sequence[int]], payloads: list[memoryview], n: int) -> list[int | None]:
        cb = len(payloads[0])
        flat = self._stage(len(payloads) * cb)
        # The gather is launched first, the slots looked up while it runs; the D2H is queued
        # before the hash is launched (a Triton launch costs 20-70 us of host time, which the
        # copy engine would otherwise sit out), the hash beside it.
        self._rows([(c, ids, 0) for c, ids in enumerate(block_ids)], flat, n, to_staging=True)
        gathered = torch.cuda.Event()
        gathered.record(self.stream)
        self._move(self._slots(payloads), flat, to_host=True)
        if not self.gpu_checksums:
            self.stream.synchronize()
            return [None] * len(payloads)
        sums, _ = self._hash_async(flat, len(payloads), after=gathered)
        with torch.cuda.stream(self.hash_stream):
            host = self._to_host(sums)
        self.stream.synchronize()
        self.hash_stream.synchronize()
        return [v & _U64 for v in host.tolist()]

    def load_many(self, payloads: Sequence[memoryview], checksums: Sequence[int],
                  targets: Sequence[tuple[Sequence[int], int]], n_blocks: int) -> list[bool]:
        """Copy the unverified chunks in ``payloads`` (``n_blocks`` blocks per layer each) to
        the GPU, hash the copies there, and write each chunk that matches its checksum, from
        block ``skip`` on, into blocks ``ids`` of every layer (``targets[c] = (ids, skip)``),
        in one scatter; per chunk, whether it matched (False: nothing of it was written).
        The payloads may be released once this returns."""
        if not len(payloads) == len(checksums) == len(targets):
            raise ValueError("one checksum and one target per payload")
        if not payloads:
            return []
        self._check_sizes(payloads, n_blocks)
        slots = self._slots(payloads)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        ok: list[bool] = []
        for g in _groups(len(payloads), len(payloads[0])):
            ok += self._load_group(slots.pick(g), [checksums[c] for c in g], [targets[c] for c in g], n_blocks)
        return ok

    def _load_group(self, slots: Slots, checksums: list[int], targets: list[tuple[Sequence[int], int]],
                    n: int) -> list[bool]:
        return self._verify_and_scatter(self._copy_in(slots), checksums, targets, n)

    def _verify_and_scatter(self, flat: torch.Tensor, checksums: Sequence[int],
                            targets: Sequence[tuple[Sequence[int], int]], n: int) -> list[bool]:
        """The end of every load: hash the chunks whose copies into ``flat`` are queued on the
        side stream, compare each with its checksum, and scatter the ones that match in one
        launch (``targets[c] = (ids, skip)``); per chunk, whether it matched. When this returns
        the copies have landed: their sources may go.

        With ``device_verdicts`` the comparison is on the GPU and the scatter is queued right
        behind it, reading the flags there (a chunk whose flag is 0 writes nothing); the host
        waits once, for the flags it reports::

            hash stream:  ids, pos, checksums (H2D) | wait copies | xxh3 | fold + compare --D2H--> flags
            side stream:  copies ...................................................| scatter (flagged)

        Otherwise (per-layer caches, or ``device_verdicts`` off) the host reads the flags first
        and queues a scatter of the matching chunks only."""
        every = [(c, ids, skip) for c, (ids, skip) in enumerate(targets)]
        on_device = self.fused_copies and self.device_verdicts
        h = self.hash_stream
        try:
            with torch.cuda.stream(h):  # uploaded while the copies run
                index = self._index(every, n, checksums)
            _, flags = self._hash_async(flat, len(targets), expected=index.tail(len(targets)))
            assert flags is not None
            if on_device:  # queued before the flags' copy to the host, so it need not wait for it
                self.stream.wait_stream(h)
                self._scatter(every, flat, n, index, flags)
                if flags.is_cuda:  # made on the hash stream, read on the side one: kept until the scatter ran
                    index.dev.record_stream(self.stream)
                    flags.record_stream(self.stream)
            with torch.cuda.stream(h):
                verdicts = self._to_host(flags)
            h.synchronize()  # the copies have landed too
        except BaseException:
            self.stream.synchronize()  # no copy may still read a source once the caller lets it go
            h.synchronize()
            raise
        matched = [bool(v) for v in verdicts.tolist()]
        if not on_device:
            self._scatter([chunk for chunk, m in zip(every, matched, strict=True) if m], flat, n)
        return matched

    # -- one chunk (the same code, one chunk long) -----------------------------------------

    def extract(self, block_ids: Sequence[int], payload: memoryview) -> int | None:
        """``extract_many`` of one chunk."""
        return self.extract_many([block_ids], [payload])[0]

    def load_checked(self, payload: memoryview, checksum: int, block_ids: Sequence[int], n_blocks: int,
                     skip_blocks: int) -> bool:
        """``load_many`` of one chunk."""
        return self.load_many([payload], [checksum], [(block_ids, skip_blocks)], n_blocks)[0]

    def inject(self, payload: memoryview, block_ids: Sequence[int], n_blocks: int, skip_blocks: int) -> None:
        """Copy the (host-verified) chunk in ``payload`` (``n_blocks`` blocks per layer) to the
        GPU and write its blocks from ``skip_blocks`` on into ``block_ids`` of every layer."""
        self._check_sizes([payload], n_blocks)
        slots = self._slots([payload])
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        flat = self._copy_in(slots)
        landed = torch.cuda.Event()
        landed.record(self.stream)
        try:
            self._scatter([(0, block_ids, skip_blocks)], flat, n_blocks)  # queued behind the copy
        finally:
            landed.synchronize()  # the slot is unpinned (may be evicted) once this returns

    def _copy_in(self, slots: Slots) -> torch.Tensor:
        """Queue the H2D of the slots into staging on the side stream."""
        flat = self._stage(len(slots.views) * len(slots.views[0]))
        self._move(slots, flat, to_host=False)
        return flat

    def _scatter(self, chunks: Sequence[Staged], flat: torch.Tensor, n: int, index: Index | None = None,
                 flags: torch.Tensor | None = None) -> None:
        """Scatter on the side stream; the engine's stream waits for it before its forward."""
        if chunks:
            self._rows(chunks, flat, n, to_staging=False, index=index, flags=flags)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def close(self) -> None:
        """Wait for the streams; the segments stay registered for the process's life."""
        self.stream.synchronize()
        self.hash_stream.synchronize()

    # -- the device tier (kvstore/transport/cuda_ipc.py) -----------------------------------

    def extract_many_staged(self, block_ids: Sequence[Sequence[int]], payloads: Sequence[memoryview],
                            on_staged: Callable[[torch.Tensor, int, int], None]) -> list[int | None]:
        """``extract_many``, one staging group at a time, calling ``on_staged(flat, n_chunks,
        chunk_bytes)`` after each group while staging (``flat``) still holds its chunks back to
        back, with the side stream current: what it queues there (the device tier's copies)
        runs before the next group's gather reuses staging, and is done when this returns."""
        if len(block_ids) != len(payloads):
            raise ValueError(f"{len(block_ids)} block lists for {len(payloads)} payloads")
        if not payloads:
            return []
        cb = len(payloads[0])
        out: list[int | None] = []
        try:
            for g in _groups(len(payloads), cb):  # each call below is one group: staging[:len(g) * cb]
                out += self.extract_many([block_ids[c] for c in g], [payloads[c] for c in g])
                with torch.cuda.stream(self.stream):
                    on_staged(self._staging[: len(g) * cb], len(g), cb)
        finally:
            self.stream.synchronize()
        return out

    def load_from_device(self, srcs: Sequence[torch.Tensor], checksums: Sequence[int],
                         targets: Sequence[tuple[Sequence[int], int]], n_blocks: int) -> list[bool]:
        """``load_many`` for chunks already in GPU memory (uint8 tensors: device-tier slots,
        another process's opened through CUDA IPC): each is copied device to device into
        staging, hashed there, compared with its checksum, and the matches scattered into
        their blocks in one launch; per chunk, whether it matched (False: nothing of it was
        written). A source its owner rewrote under the copy fails its checksum. The sources
        may go once this returns."""
        if not len(srcs) == len(checksums) == len(targets):
            raise ValueError("one checksum and one target per source")
        if not srcs:
            return []
        cb = len(self.blocks) * n_blocks * self.row_bytes
        for src in srcs:
            if src.dtype != torch.uint8 or src.numel() != cb:
                raise ValueError(f"a device source must be {cb} B of uint8, not {src.numel()} {src.dtype}")
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the engine may still read these blocks
        ok: list[bool] = []
        for g in _groups(len(srcs), cb):
            flat = self._stage(len(g) * cb)
            with torch.cuda.stream(self.stream):  # one copy per run of adjacent sources (a ring's slots)
                for a, b in device_runs([srcs[i] for i in g], cb):
                    flat[a * cb : b * cb].copy_(_spanning(srcs[g[a]], (b - a) * cb), non_blocking=True)
            ok += self._verify_and_scatter(flat, [checksums[i] for i in g], [targets[i] for i in g], n_blocks)
        return ok


def _groups(n_chunks: int, chunk_bytes: int) -> list[range]:
    """A request's chunks in runs of at most GROUP_BYTES of staging (at least one chunk)."""
    per = max(1, GROUP_BYTES // max(1, chunk_bytes))
    return [range(a, min(a + per, n_chunks)) for a in range(0, n_chunks, per)]


