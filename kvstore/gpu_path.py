"""The connector's KV copies when the engine's cache is on a CUDA device (imported only then).

What it does differently from the generic path in ``kvstore/connector.py`` (same bytes, same
slot layout, same checksums):

- the store segment's mapping is registered with CUDA as pinned host memory once per process
  (``cudaHostRegister``), so copies between the GPU and a slot run at DMA speed instead of
  through the driver's pageable bounce buffers (~55 against ~15 GB/s on an H200);
- a chunk's blocks of every layer are gathered on the GPU into a staging tensor laid out as
  the slot is, and scattered back from one, in ONE launch for all layers (``_copy_rows``,
  through a table of the layers' base addresses): one ``index_select`` / ``index_copy_`` per
  layer cost ~200 us of launches per chunk, more than a 4 MiB copy. Caches whose block rows
  are not contiguous 8-byte-aligned runs keep the per-layer ops;
- checksums are taken on the GPU (``kvstore/gpu_xxh3.py``: the same xxh3-64 per
  ``CHECK_BLOCK``, bit for bit), never by the host over the payload:

      save:  gather -> staging --D2H (one copy)------------------------------> slot
                          `--xxh3 per block (other stream)--> digests (64 B) --> seal
      load:  slot --H2D (one copy)--> staging --xxh3--> digests --> host compares with
             the slot's checksum --> scatter into the paged blocks only if it matched

  ``extract`` returns the payload's checksum for ``StoreClient.batch_put`` to seal with;
  ``load_checked`` is ``StoreClient.batch_get_self_verified``'s check: it runs while the slot
  is pinned and says whether the copy matched.

If the kernels fail their self-check against xxhash at start (``GpuKVPath.gpu_checksums`` is
then False), the checksums stay on the host: ``extract`` returns None (the client hashes the
slot) and loads go through the client's verified read and ``inject``.

A payload that is not in a mapped segment (a staging buffer shipped to another node) is copied
the same way, unpinned: still correct, just slower.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

import torch
import triton
import triton.language as tl

from kvstore import segment as seg
from kvstore.logging import get_logger

log = get_logger(__name__)

_ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered
_ROW_TILE = 1024  # 8-byte words per program of _copy_rows (8 KiB)


@triton.jit  # type: ignore[untyped-decorator]  # Triton types a kernel when it specialises it
def _copy_rows(table, strides, ids, staging, n_ids, n_blocks, skip, row_words,  # type: ignore[no-untyped-def]
               TO_STAGING: tl.constexpr, TILE: tl.constexpr):
    """Between block ``ids[j]`` of layer ``l`` (a row of ``row_words`` int64 words at address
    ``table[l] + ids[j] * strides[l]`` words) and staging row ``l * n_blocks + skip + j``;
    one program per (layer, id) and TILE words of its row."""
    r = tl.program_id(0)
    layer = r // n_ids
    j = r % n_ids
    base = tl.load(table + layer).to(tl.pointer_type(tl.int64))
    row = base + tl.load(ids + j) * tl.load(strides + layer)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    m = cols < row_words
    stage = staging + (layer * n_blocks + skip + j).to(tl.int64) * row_words
    if TO_STAGING:
        tl.store(stage + cols, tl.load(row + cols, mask=m), mask=m)
    else:
        tl.store(row + cols, tl.load(stage + cols, mask=m), mask=m)


def _gpu_checksums_work(device: torch.device) -> bool:
    """Whether kvstore.gpu_xxh3 imports and agrees with segment.block_digest here (a short
    and a multi-block probe); logged and False if not."""
    try:
        from kvstore import gpu_xxh3

        for n in (3000, seg.CHECK_BLOCK + 333):
            probe = os.urandom(n)
            t = torch.frombuffer(bytearray(probe), dtype=torch.uint8).to(device)
            got = gpu_xxh3.as_unsigned(gpu_xxh3.block_digests(t))
            if got != [seg.block_digest(probe[a:b]) for a, b in seg.check_blocks(n)]:
                log.warning("GPU xxh3 disagrees with xxhash: checksums stay on the host")
                return False
        return True
    except Exception as e:
        log.warning("GPU xxh3 unavailable, checksums stay on the host: %s: %s", type(e).__name__, e)
        return False


class HostRegistry:
    """cudaHostRegister each mapped segment once; ``pinned(payload)`` says whether a payload
    view lies in a registered mapping (registering it on first sight)."""

    def __init__(self) -> None:
        self._maps: dict[int, tuple[mmap.mmap, int, bool]] = {}  # id(mmap) -> (mmap, base, ok)
        self._cudart: Any = None

    def pinned(self, payload: memoryview) -> bool:
        mm = payload.obj
        if not isinstance(mm, mmap.mmap) or mm.closed:
            return False
        entry = self._maps.get(id(mm))
        if entry is not None and entry[0] is mm:
            return entry[2]
        self._forget_closed()
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))  # the anchor is dropped at once
        ok = self._register(base, len(mm))
        self._maps[id(mm)] = (mm, base, ok)
        return ok

    def _rt(self) -> Any:
        if self._cudart is None:
            self._cudart = torch.cuda.cudart()
        return self._cudart

    def _register(self, base: int, size: int) -> bool:
        try:
            err = self._rt().cudaHostRegister(base, size, 0)
        except Exception as e:  # no binding: stay on pageable copies
            log.warning("cudaHostRegister unavailable, KV copies stay pageable: %s", e)
            return False
        if int(err) == _ALREADY_REGISTERED:
            return True
        if int(err) != 0:
            log.warning("cudaHostRegister of a %d B segment failed (%s), KV copies stay pageable", size, err)
            _clear_last_cuda_error()  # else torch's next launch check reports it
            return False
        log.info("registered a %d MiB store segment with CUDA (pinned)", size >> 20)
        return True

    def _forget_closed(self) -> None:
        for key, (mm, base, ok) in list(self._maps.items()):
            if mm.closed:
                del self._maps[key]
                if ok:
                    try:
                        self._rt().cudaHostUnregister(base)
                    except Exception:
                        pass

    def close(self) -> None:
        for mm, base, ok in self._maps.values():
            if ok and not mm.closed:
                try:
                    self._rt().cudaHostUnregister(base)
                except Exception:
                    pass
        self._maps.clear()


REGISTRY = HostRegistry()  # one per process: a mapping is registered once, whoever copies


class GpuKVPath:
    """Gather/scatter of whole chunks between paged CUDA KV blocks and slot payloads."""

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
        self._digests_host = torch.empty(0, dtype=torch.int64, pin_memory=True)
        self.gpu_checksums = _gpu_checksums_work(self.device)
        words = [r.stride(0) * r.element_size() // 8 for r in blocks]
        self._table = torch.tensor([r.data_ptr() for r in blocks], dtype=torch.int64, device=self.device)
        self._strides = torch.tensor(words, dtype=torch.int64, device=self.device)
        self.fused_copies = self._fused_copies_work()
        log.info("GPU KV path: checksums on the GPU %s, one-launch gather/scatter %s",
                 self.gpu_checksums, self.fused_copies)

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
            with torch.cuda.stream(self.stream):
                flat, view = self._stage(n * len(self.blocks) * self.row_bytes, n)
                idt = torch.tensor(ids, dtype=torch.long, device=self.device)
                self._launch_rows(idt, flat, n, 0, to_staging=True)
                want = torch.stack([torch.index_select(r, 0, idt) for r in self.blocks])
                same = torch.equal(flat, want.reshape(-1).view(torch.uint8))  # bytes: NaN == NaN here
                self._launch_rows(idt, flat, n, 0, to_staging=False)
            self.stream.synchronize()
            if not same:
                log.warning("the one-launch KV gather disagrees with index_select: per-layer copies")
            return same
        except Exception as e:
            log.warning("the one-launch KV gather is unavailable (%s: %s): per-layer copies", type(e).__name__, e)
            return False

    def _launch_rows(self, ids: torch.Tensor, flat: torch.Tensor, n_blocks: int, skip: int, to_staging: bool) -> None:
        """One launch for every layer, on the current stream (see ``_copy_rows``)."""
        words = self.row_bytes // 8
        grid = (len(self.blocks) * ids.numel(), triton.cdiv(words, _ROW_TILE))
        _copy_rows[grid](self._table, self._strides, ids, flat.view(torch.int64), ids.numel(), n_blocks, skip,
                         words, TO_STAGING=to_staging, TILE=_ROW_TILE)

    def _gather(self, ids: torch.Tensor, flat: torch.Tensor, view: torch.Tensor) -> None:
        if self.fused_copies:
            self._launch_rows(ids, flat, ids.numel(), 0, to_staging=True)
            return
        for layer, rows in enumerate(self.blocks):
            torch.index_select(rows, 0, ids, out=view[layer])

    def _stage(self, nbytes: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A GPU staging area for one chunk: flat bytes and the [layers, blocks, *row] view."""
        if self._staging.numel() < nbytes:
            with torch.cuda.stream(self.stream):
                self._staging = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        flat = self._staging[:nbytes]
        return flat, flat.view(self.dtype).view(len(self.blocks), n_blocks, *self.row_shape)

    def _check(self, payload: memoryview, n_blocks: int) -> int:
        nbytes = len(self.blocks) * n_blocks * self.row_bytes
        if len(payload) != nbytes:
            raise ValueError(f"chunk holds {len(payload)} B, this engine expects {nbytes}")
        return nbytes

    def _hash_async(self, flat: torch.Tensor) -> torch.Tensor:
        """Enqueue the checksum blocks' xxh3 of ``flat`` on the hash stream (after what the
        main stream has enqueued so far) and their copy to pinned host memory."""
        from kvstore import gpu_xxh3

        h = self.hash_stream
        h.wait_stream(self.stream)
        with torch.cuda.stream(h):
            digests = gpu_xxh3.block_digests(flat)
            if self._digests_host.numel() < digests.numel():
                self._digests_host = torch.empty(digests.numel(), dtype=torch.int64, pin_memory=True)
            host = self._digests_host[: digests.numel()]
            host.copy_(digests, non_blocking=True)
        return host

    @staticmethod
    def _fold(host: torch.Tensor) -> int:
        return seg.fold_digests([d & 0xFFFFFFFFFFFFFFFF for d in host.tolist()])

    def extract(self, block_ids: list[int] | tuple[int, ...], payload: memoryview) -> int | None:
        """Write blocks ``block_ids`` of every layer into ``payload`` (layer-major, as
        ``_chunk_view``); returns the payload's checksum (``segment.checksum``), taken on the
        GPU, or None when the host must take it."""
        nbytes = self._check(payload, len(block_ids))
        self.registry.pinned(payload)
        host = torch.frombuffer(payload, dtype=torch.uint8)
        s = self.stream
        s.wait_stream(torch.cuda.current_stream(self.device))  # the forward wrote these blocks
        try:
            with torch.cuda.stream(s):
                flat, view = self._stage(nbytes, len(block_ids))
                ids = torch.tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)
                self._gather(ids, flat, view)
            digests = self._hash_async(flat) if self.gpu_checksums else None
            with torch.cuda.stream(s):
                host.copy_(flat, non_blocking=True)
            s.synchronize()
            if digests is None:
                return None
            self.hash_stream.synchronize()
            return self._fold(digests)
        except BaseException:
            s.synchronize()  # no copy may still write the slot once the caller aborts it
            raise

    def load_checked(self, payload: memoryview, checksum: int, block_ids: list[int] | tuple[int, ...],
                     n_blocks: int, skip_blocks: int) -> bool:
        """Copy the unverified chunk in ``payload`` to the GPU, hash the copy there, and only
        if it matches ``checksum`` write its blocks from ``skip_blocks`` on into ``block_ids``
        of every layer; returns whether it matched (False: nothing was written)."""
        flat, view = self._copy_in(payload, n_blocks)
        try:
            digests = self._hash_async(flat)
            self.hash_stream.synchronize()  # the copy has landed too: the slot may go once we return
        except BaseException:
            self.stream.synchronize()  # no copy may still read the slot once its pin goes
            raise
        if self._fold(digests) != checksum:
            return False
        self._scatter(flat, view, block_ids, n_blocks, skip_blocks)
        return True

    def inject(self, payload: memoryview, block_ids: list[int] | tuple[int, ...], n_blocks: int,
               skip_blocks: int) -> None:
        """Copy the (host-verified) chunk in ``payload`` (``n_blocks`` blocks per layer) to the
        GPU and write its blocks from ``skip_blocks`` on into ``block_ids`` of every layer."""
        flat, view = self._copy_in(payload, n_blocks)
        landed = torch.cuda.Event()
        landed.record(self.stream)
        try:
            self._scatter(flat, view, block_ids, n_blocks, skip_blocks)  # queued behind the copy
        finally:
            landed.synchronize()  # the slot is unpinned (may be evicted) once this returns

    def _copy_in(self, payload: memoryview, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue the copy of the slot's ``payload`` into the GPU staging tensor on the side
        stream, after the engine's work so far; returns the staging tensor, flat and as blocks."""
        nbytes = self._check(payload, n_blocks)
        self.registry.pinned(payload)
        host = torch.frombuffer(payload, dtype=torch.uint8)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            flat, view = self._stage(nbytes, n_blocks)
            flat.copy_(host, non_blocking=True)
        return flat, view

    def _scatter(self, flat: torch.Tensor, view: torch.Tensor, block_ids: list[int] | tuple[int, ...],
                 n_blocks: int, skip_blocks: int) -> None:
        """Write the staged chunk's blocks from ``skip_blocks`` on into ``block_ids`` on the
        side stream; the engine's stream waits for it before its forward reads them."""
        s = self.stream
        with torch.cuda.stream(s):
            ids = torch.tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)
            if self.fused_copies:
                self._launch_rows(ids, flat, n_blocks, skip_blocks, to_staging=False)
            else:
                for layer, rows in enumerate(self.blocks):
                    rows.index_copy_(0, ids, view[layer, skip_blocks:])
        torch.cuda.current_stream(self.device).wait_stream(s)

    def close(self) -> None:
        """Wait for the streams; the segments stay registered for the process's life."""
        self.stream.synchronize()
        self.hash_stream.synchronize()


def _clear_last_cuda_error() -> None:
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart" in line}
        for lib in libs:
            ctypes.CDLL(lib).cudaGetLastError()
    except Exception:
        pass


