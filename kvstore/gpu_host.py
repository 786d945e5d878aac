"""Host memory for the CUDA KV path: store segments pinned with ``cudaHostRegister``, slot
payloads as addresses, and the copies between slots and the GPU staging buffer (one pitched
``cudaMemcpy2DAsync`` per run of slots, one ``copy_`` per slot otherwise).

Apart from ``kvstore/gpu_path.py`` because it is the one part that talks to the CUDA runtime
through ctypes (libcudart's symbols torch does not bind) and knows how the allocator lays
slots out; the kernels and the step logic never see a host address. Imported only where the
KV cache is on CUDA (``GpuKVPath``), or by CPU tests with CUDA stubbed.

A slot's payload follows its header, so a run of slots is never one contiguous payload; but
the allocator lays a request's slots out back to back, at one pitch::

    host:    [hdr|payload 0][hdr|payload 1][hdr|payload 2]      pitch = header + payload
    staging: [payload 0][payload 1][payload 2]                   (or, per layer of a chunk,
                                                                  one run of each payload)
so ONE ``cudaMemcpy2DAsync`` (rows of a payload, the slot pitch apart on the host) moves them.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from kvstore.logging import get_logger

log = get_logger(__name__)

_ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered
_H2D, _D2H = 1, 2  # cudaMemcpyKind


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


class Slots(NamedTuple):
    """A group's slot payloads and their host addresses, in staging order."""

    views: Sequence[memoryview]
    addrs: list[int]

    def pick(self, idx: Sequence[int]) -> Slots:
        return Slots([self.views[i] for i in idx], [self.addrs[i] for i in idx])


class SlotCopies:
    """The slot side of ``GpuKVPath`` (a mixin: it needs ``stream``, ``device`` and
    ``registry``): payloads to addresses, and the queued copies between them and staging."""

    stream: torch.cuda.Stream
    device: torch.device
    registry: HostRegistry
    pitched_copies: bool

    def _slots(self, payloads: Sequence[memoryview]) -> Slots:
        """The payloads and their addresses (each segment registered with CUDA on first
        sight). Addresses, not tensors: ``torch.frombuffer`` cost ~6 us of host time per slot
        on the H200 machines, 100 us for a request of 16 chunks, before its first copy."""
        seen = None
        for payload in payloads:
            if payload.obj is not seen:  # a request's slots share one segment: one lookup for them all
                self.registry.pinned(payload)
                seen = payload.obj
        return Slots(payloads, [_address(p) for p in payloads])


    def _move(self, slots: Slots, flat: torch.Tensor, to_host: bool) -> None:
        """Queue the copies between the slots' payloads and their places in staging on the
        side stream: one ``cudaMemcpy2DAsync`` per run of slots at a constant pitch (the
        allocator lays a request's slots out back to back, so usually one for all of them),
        one ``copy_`` per slot otherwise."""
        cb = len(slots.views[0])
        n = len(slots.addrs)
        runs = _pitched_runs(slots.addrs, cb) if self.pitched_copies else [(c, c + 1, cb) for c in range(n)]
        dev = flat.data_ptr()
        one_by_one: list[int] = []
        for a, b, pitch in runs:
            if not (b - a > 1 and self.pitched_copies and self._copy_2d(slots.addrs[a], dev + a * cb, cb, b - a,
                                                                        pitch, to_host)):
                one_by_one += range(a, b)
        if not one_by_one:
            return
        with torch.cuda.stream(self.stream):  # entered once: ~10 us of host time each time
            for c in one_by_one:
                host = torch.frombuffer(slots.views[c], dtype=torch.uint8)
                if to_host:
                    host.copy_(flat[c * cb : (c + 1) * cb], non_blocking=True)
                else:
                    flat[c * cb : (c + 1) * cb].copy_(host, non_blocking=True)

    def _copy_2d(self, host: int, dev: int, width: int, rows: int, pitch: int, to_host: bool,
                 dev_pitch: int = 0) -> bool:
        """One ``cudaMemcpy2DAsync`` on the side stream between ``rows`` rows of ``width``
        bytes at device address ``dev``, ``dev_pitch`` bytes apart (0: back to back), and as
        many host rows from ``host`` on, ``pitch`` bytes apart; False (logged, and pitched
        copies off for good) if CUDA refuses it."""
        fn = _memcpy_2d_async()
        dp = dev_pitch or width
        args = (host, pitch, dev, dp) if to_host else (dev, dp, host, pitch)
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
            ok = self._copy_2d(host.data_ptr(), staged.data_ptr(), width, 3, pitch, to_host=False)
            self.stream.synchronize()
            ok = ok and torch.equal(staged.cpu(), torch.cat(rows))
            back = torch.zeros_like(host)
            ok = ok and self._copy_2d(back.data_ptr(), staged.data_ptr(), width, 3, pitch, to_host=True)
            self.stream.synchronize()
            return ok and all(torch.equal(back[r * pitch : r * pitch + width], rows[r]) for r in range(3))
        except Exception as e:
            log.warning("pitched slot copies are unavailable (%s: %s): one copy per slot", type(e).__name__, e)
            return False


def _address(view: memoryview) -> int:
    """Where ``view``'s bytes start (a writable view, as slots are, through ctypes; a
    read-only one through numpy)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except TypeError:
        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)



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



def _clear_last_cuda_error() -> None:
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart" in line}
        for lib in libs:
            ctypes.CDLL(lib).cudaGetLastError()
    except Exception:
        pass


