"""The connector's KV copies when the engine's cache is on a CUDA device (imported only then).

What it does differently from the generic path in ``kvstore/connector.py`` (same bytes, same
slot layout, same checksums):

- the store segment's mapping is registered with CUDA as pinned host memory once per process
  (``cudaHostRegister``), so copies between the GPU and a slot run at DMA speed instead of
  through the driver's pageable bounce buffers (~55 against ~15 GB/s on an H200);
- a chunk's blocks of every layer are gathered on the GPU (one ``index_select`` per layer into
  a staging tensor laid out as the slot is) and leave in one stream of copies on a side CUDA
  stream, ``PIECE`` bytes each with an event after each, instead of one synchronous copy per
  layer;
- the slot's checksum (xxh3 per ``CHECK_BLOCK``, ``kvstore.segment``) is taken on a pool of
  threads, each block as soon as its piece has landed, so hashing overlaps the copy; the
  digest is handed to ``Segment.seal`` (``segment.hint_digest``) so the seal does not hash the
  payload a second time. Reads verify with the same pool (``segment.parallel_checksums``).
- a load copies the verified slot to the GPU in one copy, waits for that copy only (the slot is
  unpinned once the callback returns), and scatters it into the paged blocks on the side stream;
  the engine's stream waits for that scatter before its forward.

A payload that is not in a mapped segment (a staging buffer shipped to another node) is copied
the same way, unpinned: still correct, just slower.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kvstore import segment as seg
from kvstore.logging import get_logger

log = get_logger(__name__)

_ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered
PIECE = 2 * seg.CHECK_BLOCK  # bytes per D2H copy (whole checksum blocks), an event after each


def piece_spans(nbytes: int, piece: int = PIECE) -> list[tuple[int, int]]:
    """The copies a payload of ``nbytes`` is split into: (start, end), ``piece`` bytes each
    (a multiple of ``CHECK_BLOCK``, so no checksum block spans two copies), the last shorter."""
    if piece <= 0 or piece % seg.CHECK_BLOCK:
        raise ValueError(f"piece {piece} is not a positive multiple of {seg.CHECK_BLOCK}")
    return [(a, min(a + piece, nbytes)) for a in range(0, max(nbytes, 1), piece)]


def piece_of(offset: int, piece: int = PIECE) -> int:
    return offset // piece


def _load_xxh3() -> Any:
    """XXH3_64bits from the xxhash extension's own library, called through ctypes (which lets
    go of the GIL for the call: the extension's Python entry point holds it on some builds, so
    several hashing threads ran one at a time), or None where the symbol is not exported or
    does not agree with ``segment.block_digest``."""
    import xxhash

    try:
        lib = ctypes.CDLL(xxhash._xxhash.__file__)
        fn = lib.XXH3_64bits
        fn.restype = ctypes.c_uint64
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        probe = bytearray(os.urandom(3000))
        addr = ctypes.addressof(ctypes.c_char.from_buffer(probe))
        if int(fn(addr, len(probe))) != seg.block_digest(bytes(probe)) or int(fn(addr, 0)) != seg.block_digest(b""):
            return None
        return fn
    except Exception:
        return None


_XXH3 = _load_xxh3()


def block_digest(block: memoryview) -> int:
    """``segment.block_digest`` without the GIL where possible (same value)."""
    if _XXH3 is None or block.readonly or not len(block):
        return seg.block_digest(block)
    return int(_XXH3(ctypes.addressof(ctypes.c_char.from_buffer(block)), len(block)))


def hash_threads() -> int:
    env = os.environ.get("PDSERVE_KV_HASH_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(8, (os.cpu_count() or 2) // 2))


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

    def __init__(self, blocks: list[torch.Tensor], threads: int | None = None) -> None:
        self.blocks = blocks
        ref = blocks[0]
        self.device = ref.device
        self.dtype = ref.dtype
        self.row_shape = tuple(ref.shape[1:])
        self.row_bytes = ref[0].numel() * ref.element_size()
        self.stream = torch.cuda.Stream(device=self.device)
        self.pool = ThreadPoolExecutor(threads or hash_threads(), thread_name_prefix="pdkv-hash")
        self.registry = REGISTRY
        self._staging = torch.empty(0, dtype=torch.uint8, device=self.device)
        seg.parallel_checksums(self._map_digests)

    def _map_digests(self, blocks: list[memoryview]) -> list[int]:
        return list(self.pool.map(block_digest, blocks))

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

    def extract(self, block_ids: list[int] | tuple[int, ...], payload: memoryview) -> None:
        """Write blocks ``block_ids`` of every layer into ``payload`` (layer-major, as
        ``_chunk_view``) and hint ``payload``'s checksum to the seal that follows."""
        nbytes = self._check(payload, len(block_ids))
        self.registry.pinned(payload)
        host = torch.frombuffer(payload, dtype=torch.uint8)
        s = self.stream
        s.wait_stream(torch.cuda.current_stream(self.device))  # the forward wrote these blocks
        events: list[torch.cuda.Event] = []
        futures = []
        try:
            with torch.cuda.stream(s):
                flat, view = self._stage(nbytes, len(block_ids))
                ids = torch.tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)
                for layer, rows in enumerate(self.blocks):
                    torch.index_select(rows, 0, ids, out=view[layer])
                for a, b in piece_spans(nbytes):
                    host[a:b].copy_(flat[a:b], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(s)
                    events.append(ev)
            # this thread waits for each copy (one spinning waiter, not one per hashing thread)
            # and hands its blocks to the pool while the next copies run
            landed = -1
            for a, b in seg.check_blocks(nbytes):
                while landed < piece_of(a):
                    landed += 1
                    events[landed].synchronize()
                futures.append(self.pool.submit(block_digest, payload[a:b]))
            digest = seg.fold_digests([f.result() for f in futures])
        except BaseException:
            s.synchronize()  # no copy may still write the slot once the caller aborts it
            for f in futures:
                f.cancel()
            raise
        seg.hint_digest(payload, digest)

    def inject(self, payload: memoryview, block_ids: list[int] | tuple[int, ...], n_blocks: int,
               skip_blocks: int) -> None:
        """Copy the chunk in ``payload`` (``n_blocks`` blocks per layer) to the GPU and write
        its blocks from ``skip_blocks`` on into ``block_ids`` of every layer."""
        nbytes = self._check(payload, n_blocks)
        self.registry.pinned(payload)
        host = torch.frombuffer(payload, dtype=torch.uint8)
        s = self.stream
        cur = torch.cuda.current_stream(self.device)
        s.wait_stream(cur)
        with torch.cuda.stream(s):
            flat, view = self._stage(nbytes, n_blocks)
            flat.copy_(host, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record(s)
            ids = torch.tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)
            for layer, rows in enumerate(self.blocks):
                rows.index_copy_(0, ids, view[layer, skip_blocks:])
        try:
            landed.synchronize()  # the slot is unpinned (may be evicted) once this returns
        finally:
            cur.wait_stream(s)  # the forward reads the loaded blocks only after the scatter

    def close(self) -> None:
        """Stop the hashing threads; the segments stay registered for the process's life."""
        seg.parallel_checksums(None)
        self.stream.synchronize()
        self.pool.shutdown(wait=True)


def _clear_last_cuda_error() -> None:
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart" in line}
        for lib in libs:
            ctypes.CDLL(lib).cudaGetLastError()
    except Exception:
        pass


