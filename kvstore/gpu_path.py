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

      save:  gather -> staging --D2H (one copy per slot, queued)-------------> slots
                          `--xxh3 per block (other stream)--> digests (8 B each) --> seals
      load:  slots --H2D (one copy per slot)--> staging --xxh3--> digests --> host compares
             each chunk with its slot's checksum --> one scatter of the chunks that matched

  A slot's payload follows its header, so a run of slots is never one contiguous payload;
  but the allocator lays a request's slots out back to back, at one pitch, so ONE
  ``cudaMemcpy2DAsync`` (rows of a payload, the slot pitch apart on the host) moves them
  all. Slots that are not at one pitch go one ``copy_`` each (~5 us of host time and a
  gap between DMA transfers each).
  ``extract_many`` returns the payloads' checksums for the client to seal with;
  ``load_many`` is ``StoreClient.batch_get_self_verified``'s check: it runs while the slots
  are pinned and says which copies matched.

If the kernels fail their self-check against xxhash at start (``GpuKVPath.gpu_checksums`` is
then False), the checksums stay on the host: ``extract`` returns None (the client hashes the
slot) and loads go through the client's verified read and ``inject``, as do chunks read
from another node (verified by the client as they land: hashing them again would be waste).

A payload that is not in a mapped segment (a staging buffer shipped to another node) is copied
the same way, unpinned: still correct, just slower.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from kvstore import segment as seg
from kvstore.logging import get_logger

log = get_logger(__name__)

_ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered
_H2D, _D2H = 1, 2  # cudaMemcpyKind
_ROW_TILE = 1024  # 8-byte words per program of _copy_rows (8 KiB)
# GPU staging per step of a request's save or load: its chunks go in runs of at most this
# many bytes (a 2k-token prompt of a 1B model is 64 MiB: one run; very long ones take a few).
GROUP_BYTES = 256 << 20
Staged = tuple[int, Sequence[int], int]  # (chunk's index in staging, its block ids, blocks skipped)


@triton.jit  # type: ignore[untyped-decorator]  # Triton types a kernel when it specialises it
def _copy_rows(table, strides, ids, pos, staging, n_ids, layer_rows, row_words,  # type: ignore[no-untyped-def]
               TO_STAGING: tl.constexpr, TILE: tl.constexpr):
    """Between block ``ids[j]`` of layer ``l`` (a row of ``row_words`` int64 words at address
    ``table[l] + ids[j] * strides[l]`` words) and staging row ``pos[j] + l * layer_rows``;
    one program per (layer, id) and TILE words of its row."""
    r = tl.program_id(0)
    layer = r // n_ids
    j = r % n_ids
    base = tl.load(table + layer).to(tl.pointer_type(tl.int64))
    row = base + tl.load(ids + j) * tl.load(strides + layer)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    m = cols < row_words
    stage = staging + (tl.load(pos + j) + layer * layer_rows) * row_words
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
        self._digests_host = torch.empty(0, dtype=torch.int64, pin_memory=True)
        self.gpu_checksums = _gpu_checksums_work(self.device)
        words = [r.stride(0) * r.element_size() // 8 for r in blocks]
        self._table = torch.tensor([r.data_ptr() for r in blocks], dtype=torch.int64, device=self.device)
        self._strides = torch.tensor(words, dtype=torch.int64, device=self.device)
        self.fused_copies = self._fused_copies_work()
        self.pitched_copies = False
        self.pitched_copies = self._pitched_copies_work()
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
                self._launch(chunks, flat, n, to_staging=True)
                idt = torch.tensor(ids, dtype=torch.long, device=self.device)
                want = torch.stack([torch.index_select(r, 0, idt) for r in self.blocks])
                same = torch.equal(flat, want.reshape(-1).view(torch.uint8))  # bytes: NaN == NaN here
                self._launch(chunks, flat, n, to_staging=False)
            self.stream.synchronize()
            if not same:
                log.warning("the one-launch KV gather disagrees with index_select: per-layer copies")
            return same
        except Exception as e:
            log.warning("the one-launch KV gather is unavailable (%s: %s): per-layer copies", type(e).__name__, e)
            return False

    # -- the copies ------------------------------------------------------------------------

    def _index(self, chunks: Sequence[Staged], n: int) -> torch.Tensor | None:
        """``_copy_rows``' ids and positions for ``chunks`` on the GPU (one H2D, queued on the
        current stream), or None when there are none."""
        ids, pos = staging_rows(chunks, len(self.blocks), n)
        return torch.tensor([ids, pos], dtype=torch.int64).to(self.device, non_blocking=True) if ids else None

    def _launch(self, chunks: Sequence[Staged], flat: torch.Tensor, n: int, to_staging: bool,
                index: torch.Tensor | None = None) -> None:
        """One ``_copy_rows`` launch, on the current stream, for every layer of every chunk:
        ``(c, ids, skip)`` moves staged chunk c's blocks skip.. to or from blocks ``ids``
        (``index``: their ``_index``, uploaded beforehand)."""
        both = index if index is not None else self._index(chunks, n)
        if both is None:
            return
        words = self.row_bytes // 8
        grid = (len(self.blocks) * both.shape[1], triton.cdiv(words, _ROW_TILE))
        _copy_rows[grid](self._table, self._strides, both[0], both[1], flat.view(torch.int64), both.shape[1], n,
                         words, TO_STAGING=to_staging, TILE=_ROW_TILE)

    def _rows(self, chunks: Sequence[Staged], flat: torch.Tensor, n: int, to_staging: bool,
              index: torch.Tensor | None = None) -> None:
        """Gather (``to_staging``) or scatter ``chunks`` on the side stream: one launch, or
        per-layer ops where the rows are not word runs."""
        with torch.cuda.stream(self.stream):
            if self.fused_copies:
                self._launch(chunks, flat, n, to_staging, index)
                return
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

    def _host(self, payload: memoryview, n_blocks: int) -> torch.Tensor:
        """The payload as a uint8 tensor (its segment registered with CUDA on first sight)."""
        nbytes = len(self.blocks) * n_blocks * self.row_bytes
        if len(payload) != nbytes:
            raise ValueError(f"chunk holds {len(payload)} B, this engine expects {nbytes}")
        self.registry.pinned(payload)
        return torch.frombuffer(payload, dtype=torch.uint8)

    # -- the checksums ---------------------------------------------------------------------

    def _hash_async(self, flat: torch.Tensor, n_chunks: int, after: torch.cuda.Event | None = None) -> torch.Tensor:
        """Enqueue the xxh3 of every checksum block of the ``n_chunks`` equal chunks in
        ``flat`` on the hash stream (after ``after``, else after what the side stream has
        enqueued so far), and their copy to pinned host memory; chunk c's digests are the
        c-th ``n_chunks``-th."""
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
            if self._digests_host.numel() < digests.numel():
                self._digests_host = torch.empty(digests.numel(), dtype=torch.int64, pin_memory=True)
            host = self._digests_host[: digests.numel()]
            host.copy_(digests, non_blocking=True)
        return host

    @staticmethod
    def _folds(host: torch.Tensor, n_chunks: int) -> list[int]:
        """Each chunk's checksum (``segment.checksum``) from its blocks' digests."""
        vals = [d & 0xFFFFFFFFFFFFFFFF for d in host.tolist()]
        per = len(vals) // n_chunks
        return [seg.fold_digests(vals[c * per : (c + 1) * per]) for c in range(n_chunks)]

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
        hosts = [self._host(p, n) for p in payloads]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the forward wrote these blocks
        out: list[int | None] = []
        try:
            for g in _groups(len(hosts), len(payloads[0])):
                out += self._extract_group([block_ids[c] for c in g], [hosts[c] for c in g], n)
        except BaseException:
            self.stream.synchronize()  # no copy may still write a slot once the caller aborts it
            raise
        return out

    def _extract_group(self, block_ids: list[Sequence[int]], hosts: list[torch.Tensor], n: int) -> list[int | None]:
        cb = hosts[0].numel()
        flat = self._stage(len(hosts) * cb)
        self._rows([(c, ids, 0) for c, ids in enumerate(block_ids)], flat, n, to_staging=True)
        gathered = torch.cuda.Event()
        gathered.record(self.stream)
        # The D2H is queued before the hash is launched (a Triton launch costs 20-70 us of host
        # time, which the copy engine would otherwise sit out), the hash beside it.
        self._move(hosts, flat, to_host=True)
        digests = self._hash_async(flat, len(hosts), after=gathered) if self.gpu_checksums else None
        self.stream.synchronize()
        if digests is None:
            return [None] * len(hosts)
        self.hash_stream.synchronize()
        return list(self._folds(digests, len(hosts)))

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
        hosts = [self._host(p, n_blocks) for p in payloads]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        ok: list[bool] = []
        for g in _groups(len(hosts), hosts[0].numel()):
            ok += self._load_group([hosts[c] for c in g], [checksums[c] for c in g], [targets[c] for c in g],
                                   n_blocks)
        return ok

    def _load_group(self, hosts: list[torch.Tensor], checksums: list[int],
                    targets: list[tuple[Sequence[int], int]], n: int) -> list[bool]:
        return self._verify_and_scatter(self._copy_in(hosts), checksums, targets, n)

    def _verify_and_scatter(self, flat: torch.Tensor, checksums: Sequence[int],
                            targets: Sequence[tuple[Sequence[int], int]], n: int) -> list[bool]:
        """The end of every load: hash the chunks whose copies into ``flat`` are queued on the
        side stream, compare each with its checksum, and scatter the ones that match in one
        launch (``targets[c] = (ids, skip)``); per chunk, whether it matched. When this returns
        the copies have landed: their sources may go."""
        every = [(c, ids, skip) for c, (ids, skip) in enumerate(targets)]
        try:
            digests = self._hash_async(flat, len(targets))
            with torch.cuda.stream(self.stream):  # while the copies run: the scatter's index, as if all match
                index = self._index(every, n) if self.fused_copies else None
            self.hash_stream.synchronize()  # the copies have landed too
        except BaseException:
            self.stream.synchronize()  # no copy may still read a source once the caller lets it go
            raise
        matched = [got == want for got, want in zip(self._folds(digests, len(targets)), checksums, strict=True)]
        if all(matched):
            self._scatter(every, flat, n, index)
        else:
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
        host = self._host(payload, n_blocks)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        flat = self._copy_in([host])
        landed = torch.cuda.Event()
        landed.record(self.stream)
        try:
            self._scatter([(0, block_ids, skip_blocks)], flat, n_blocks)  # queued behind the copy
        finally:
            landed.synchronize()  # the slot is unpinned (may be evicted) once this returns

    def _copy_in(self, hosts: list[torch.Tensor]) -> torch.Tensor:
        """Queue the H2D of the slots into staging on the side stream."""
        flat = self._stage(len(hosts) * hosts[0].numel())
        self._move(hosts, flat, to_host=False)
        return flat

    def _move(self, hosts: list[torch.Tensor], flat: torch.Tensor, to_host: bool) -> None:
        """Queue the copies between the slots' payloads and their places in staging on the
        side stream: one ``cudaMemcpy2DAsync`` per run of slots at a constant pitch (the
        allocator lays a request's slots out back to back, so usually one for all of them),
        one ``copy_`` per slot otherwise."""
        cb = hosts[0].numel()
        runs = _pitched_runs([h.data_ptr() for h in hosts], cb) if self.pitched_copies else \
            [(c, c + 1, cb) for c in range(len(hosts))]
        with torch.cuda.stream(self.stream):
            for a, b, pitch in runs:
                if b - a > 1 and self.pitched_copies and self._copy_2d(hosts[a], flat[a * cb : b * cb], pitch, to_host):
                    continue
                for c in range(a, b):
                    if to_host:
                        hosts[c].copy_(flat[c * cb : (c + 1) * cb], non_blocking=True)
                    else:
                        flat[c * cb : (c + 1) * cb].copy_(hosts[c], non_blocking=True)

    def _copy_2d(self, first: torch.Tensor, staged: torch.Tensor, pitch: int, to_host: bool) -> bool:
        """One ``cudaMemcpy2DAsync`` on the side stream between ``staged`` (rows of
        ``first.numel()`` bytes, back to back) and as many host rows from ``first`` on, ``pitch``
        bytes apart; False (logged, and pitched copies off for good) if CUDA refuses it."""
        width = first.numel()
        rows = staged.numel() // width
        host, dev = first.data_ptr(), staged.data_ptr()
        fn = _memcpy_2d_async()
        args = (host, pitch, dev, width) if to_host else (dev, width, host, pitch)
        err = fn(*args, width, rows, _D2H if to_host else _H2D, self.stream.cuda_stream) if fn else -1
        if err == 0:
            return True
        log.warning("cudaMemcpy2DAsync failed (%s): slot copies go one by one", err)
        _clear_last_cuda_error()
        self.pitched_copies = False
        return False

    def _pitched_copies_work(self) -> bool:
        """Whether a pitched H2D and D2H of three rows through ``_copy_2d`` moves the same
        bytes as row-by-row copies (a wrong pitch would scatter KV over the wrong slots)."""
        if _memcpy_2d_async() is None:
            return False
        try:
            width, pitch = 4096, 4096 + 512
            host = torch.empty(3 * pitch, dtype=torch.uint8, pin_memory=True)
            host.copy_(torch.randint(0, 256, (3 * pitch,), dtype=torch.uint8))
            rows = [host[r * pitch : r * pitch + width] for r in range(3)]
            staged = torch.empty(3 * width, dtype=torch.uint8, device=self.device)
            ok = self._copy_2d(rows[0], staged, pitch, to_host=False)
            self.stream.synchronize()
            ok = ok and torch.equal(staged.cpu(), torch.cat(rows))
            back = torch.zeros_like(host)
            ok = ok and self._copy_2d(back[:width], staged, pitch, to_host=True)
            self.stream.synchronize()
            return ok and all(torch.equal(back[r * pitch : r * pitch + width], rows[r]) for r in range(3))
        except Exception as e:
            log.warning("pitched slot copies are unavailable (%s: %s): one copy per slot", type(e).__name__, e)
            return False

    def _scatter(self, chunks: Sequence[Staged], flat: torch.Tensor, n: int, index: torch.Tensor | None = None) -> None:
        """Scatter on the side stream; the engine's stream waits for it before its forward."""
        if chunks:
            self._rows(chunks, flat, n, to_staging=False, index=index)
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


def staging_rows(chunks: Sequence[Staged], layers: int, n: int) -> tuple[list[int], list[int]]:
    """``_copy_rows``' ``ids`` and ``pos`` for ``chunks`` of ``n`` blocks per layer staged
    back to back: block k of staged chunk c, layer 0, is staging row c * layers * n + k (the
    kernel adds l * n for layer l); a chunk's ids start at its block ``skip``."""
    ids = [b for _, ids_c, _ in chunks for b in ids_c]
    pos = [c * layers * n + skip + k for c, ids_c, skip in chunks for k in range(len(ids_c))]
    return ids, pos


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


def _pitched_runs(ptrs: Sequence[int], width: int) -> list[tuple[int, int, int]]:
    """``ptrs`` (the slots' payload addresses, in staging order) as runs ``(a, b, pitch)``:
    slots a..b-1 lie ``pitch`` bytes apart, ``pitch >= width`` (rows never overlap); a slot
    with no such neighbour is a run of one."""
    runs: list[tuple[int, int, int]] = []
    a = 0
    while a < len(ptrs):
        b, pitch = a + 1, width
        if b < len(ptrs) and ptrs[b] - ptrs[a] >= width:
            pitch = ptrs[b] - ptrs[a]
            while b < len(ptrs) and ptrs[b] - ptrs[b - 1] == pitch:
                b += 1
        runs.append((a, b, pitch))
        a = b
    return runs


@functools.cache
def _memcpy_2d_async() -> Any:
    """The CUDA runtime's ``cudaMemcpy2DAsync`` (from the libcudart torch loaded; torch does
    not bind it), or None."""
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "libcudart.so" in line})
        fn = ctypes.CDLL(libs[0]).cudaMemcpy2DAsync
    except Exception as e:
        log.info("cudaMemcpy2DAsync not found (%s): one copy per slot", e)
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                   ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def _groups(n_chunks: int, chunk_bytes: int) -> list[range]:
    """A request's chunks in runs of at most GROUP_BYTES of staging (at least one chunk)."""
    per = max(1, GROUP_BYTES // max(1, chunk_bytes))
    return [range(a, min(a + per, n_chunks)) for a in range(0, n_chunks, per)]


def _clear_last_cuda_error() -> None:
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart" in line}
        for lib in libs:
            ctypes.CDLL(lib).cudaGetLastError()
    except Exception:
        pass


