"""A named shared-memory segment holding KV chunks, and the slot format inside it.

The Store Agent creates the segment; engine processes on the same node map it by name and
read/write slots directly (no copy through a socket, no pickle). We map ``/dev/shm/<name>``
ourselves instead of using ``multiprocessing.shared_memory``: on Python 3.11 attaching through
that class registers the segment with the attaching process's resource tracker, which unlinks
it when that process exits, taking the agent's segment down with an engine.

Slot layout (every slot starts 64-byte aligned; the payload stays aligned too):

    0        8         24        32         40        48            64
    | magic  | key(16) | length  | checksum | touched  | reserved   | payload (length bytes) ...

The checksum is xxh3-64 of the payload, taken per block of ``CHECK_BLOCK`` bytes: a payload
of one block has the block's xxh3-64, a larger one the xxh3-64 of its blocks' digests. xxh3
runs at ~15 GB/s from cache here (zlib's crc32: ~3), and blocks let a reader verify a large
slot on several threads, each block right after it copied it, while it is in that core's
cache. A reader trusts a slot only if magic, key, length and checksum all match what it
expects, so a slot that was evicted and reused under a reader is detected, never served.
``touched`` is the last read's CLOCK_MONOTONIC time in ns, written by readers
(outside the checksum) so the agent's LRU sees same-node reads without a round trip.

Readers pin a slot with a shared byte-range lock on the segment file (``SlotLocks``: Linux
open-file-description locks); the agent evicts a slot only after taking the exclusive lock.
A lock costs two syscalls (~3 us), not an RPC, and dies with its process, so a crashed
reader can never pin a slot forever.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import time

import xxhash

HEADER_BYTES = 64
CHECK_BLOCK = 1 << 20  # checksum block: fits one core's L2 here, so a copied block is hashed from cache
_MAGIC = b"PDKV0002"  # 0002: block checksums
_HEADER = struct.Struct("<8s16sQQ")  # magic, key, payload length, checksum
_TOUCHED = struct.Struct("<Q")
_TOUCHED_AT = 40
# struct flock on Linux (x86_64 and aarch64): l_type, l_whence, l_start, l_len, l_pid
_FLOCK = struct.Struct("hhxxxxqqixxxx")
SHM_DIR = "/dev/shm"


class SlotCorrupt(Exception):
    """The slot does not hold the chunk the reader expected (evicted, reused, torn)."""


def copy_into(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` at memcpy speed, and without holding the GIL.

    A plain memoryview slice assignment out of (or into) an mmap of /dev/shm ran at half the
    speed of memcpy here for 64 KiB pieces (per-copy overhead inside CPython); ctypes.memmove
    on the same addresses runs at full speed and releases the GIL while it copies.
    """
    n = len(src)
    if len(dst) != n:
        raise ValueError(f"copy of {n} bytes into {len(dst)}")
    if n < 4096 or dst.readonly or src.readonly:
        dst[:] = src
        return
    ctypes.memmove(_address(dst), _address(src), n)


def _address(view: memoryview) -> int:
    anchor = ctypes.c_char.from_buffer(view)  # released as soon as it is collected
    return ctypes.addressof(anchor)


def checksum(data: memoryview | bytes) -> int:
    return fold_digests([block_digest(data[a:b]) for a, b in check_blocks(len(data))])


def block_digest(block: memoryview | bytes) -> int:
    """One checksum block's digest (xxh3-64; runs without the GIL)."""
    return int(xxhash.xxh3_64_intdigest(block))


def check_blocks(length: int) -> list[tuple[int, int]]:
    """The payload's checksum blocks as (start, end); a zero-length payload has one, empty."""
    return [(a, min(a + CHECK_BLOCK, length)) for a in range(0, max(length, 1), CHECK_BLOCK)]


def fold_digests(digests: list[int]) -> int:
    """The payload's checksum from its blocks' xxh3-64 digests, in order."""
    if len(digests) == 1:
        return digests[0]
    return int(xxhash.xxh3_64_intdigest(struct.pack(f"<{len(digests)}Q", *digests)))


class Segment:
    """A mapping of one shared-memory segment (owner or reader)."""

    def __init__(self, name: str, size: int, *, create: bool) -> None:
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        self.owner = create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self.size = size
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap)
        self.locks = SlotLocks(self.path)

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        return cls(name, size, create=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        return cls(name, 0, create=False)

    def payload(self, offset: int, length: int) -> memoryview:
        start = offset + HEADER_BYTES
        return self.buf[start : start + length]

    def seal(self, offset: int, key: bytes, length: int, digest: int | None = None) -> int:
        """Write the header after the payload is in place; returns the payload's checksum
        (``digest`` when the writer already took it, see ``seal_slot``)."""
        return seal_slot(self.buf, offset, key, length, digest)

    def verify(self, offset: int, key: bytes, length: int, digest: int) -> memoryview:
        """Return the payload if the slot holds exactly this chunk, else raise SlotCorrupt."""
        return check_slot(self.buf, offset, key, length, digest)

    def touch(self, offset: int) -> None:
        _TOUCHED.pack_into(self.buf, offset + _TOUCHED_AT, time.monotonic_ns())

    def touched_ns(self, offset: int) -> int:
        return int(_TOUCHED.unpack_from(self.buf, offset + _TOUCHED_AT)[0])

    def invalidate(self, offset: int) -> None:
        """Clear the header so no reader accepts the slot any more (called before reuse)."""
        self.buf[offset : offset + 8] = b"\0" * 8

    def close(self) -> None:
        """Unmap, and as the owner remove the file. The file goes even when the mapping
        cannot close yet (``BufferError``: a view of it is still alive; the mapping then goes
        with the last view), so no segment outlives its owner's close in ``/dev/shm``."""
        try:
            self.locks.close()
            self.buf.release()
            self._mmap.close()
        finally:
            if self.owner:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass


class SlotLocks:
    """Byte-range locks on one segment file, through a descriptor of their own (OFD locks
    belong to the open file description, so they neither clash with nor vanish with other
    descriptors of the same file in this process)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR)

    def _set(self, kind: int, offset: int, length: int) -> bool:
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, offset, length, 0))
        except (BlockingIOError, PermissionError):
            return False
        return True

    def try_shared(self, offset: int, length: int) -> bool:
        """Pin for reading; False while the agent is evicting the slot."""
        return self._set(fcntl.F_RDLCK, offset, length)

    def try_exclusive(self, offset: int, length: int) -> bool:
        """For eviction; False while any reader holds the slot."""
        return self._set(fcntl.F_WRLCK, offset, length)

    def unlock(self, offset: int, length: int) -> None:
        self._set(fcntl.F_UNLCK, offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def seal_slot(buf: memoryview, offset: int, key: bytes, length: int, digest: int | None = None) -> int:
    """Write the header of the slot at ``offset`` of ``buf`` (a segment or a staging buffer)
    once its payload is in place; returns the payload's checksum.

    ``digest`` is ``checksum()`` of the payload as its writer took it while writing (the CUDA
    KV path hashes its GPU copy of the bytes): sealed as given, the payload is not read
    again. Without it the payload is hashed here."""
    if digest is None:
        digest = checksum(buf[offset + HEADER_BYTES : offset + HEADER_BYTES + length])
    _TOUCHED.pack_into(buf, offset + _TOUCHED_AT, 0)  # not the previous occupant's reads
    _HEADER.pack_into(buf, offset, _MAGIC, key, length, digest)
    return digest


class ChecksumMismatch(SlotCorrupt):
    """The slot's header is right but its payload is not what was written (bit rot, a torn
    or tampered write)."""


def slot_head(key: bytes, length: int, digest: int) -> bytes:
    """The bytes a slot holding exactly this chunk starts with (its header up to ``touched``,
    which readers write): a reader that knows them checks a header with one comparison."""
    return _HEADER.pack(_MAGIC, key, length, digest)


def check_header(buf: memoryview, offset: int, key: bytes, length: int, digest: int) -> None:
    """Raise ``SlotCorrupt`` unless the slot at ``offset`` of ``buf`` is headed as the
    expected chunk (its payload is not read: see ``check_slot``)."""
    if offset < 0 or offset + HEADER_BYTES + length > len(buf):
        raise SlotCorrupt(f"slot {offset}+{length} is outside the buffer ({len(buf)} B)")
    magic, got_key, got_len, got_digest = _HEADER.unpack_from(buf, offset)
    if magic != _MAGIC or got_key != key or got_len != length or got_digest != digest:
        raise SlotCorrupt(f"slot at {offset} holds another chunk (evicted or torn)")


def check_slot(buf: memoryview, offset: int, key: bytes, length: int, digest: int) -> memoryview:
    """The payload of the slot at ``offset`` of ``buf`` if it holds exactly the expected chunk.

    Works on a mapped segment and on slot bytes pulled from another node alike.
    """
    check_header(buf, offset, key, length, digest)
    data = buf[offset + HEADER_BYTES : offset + HEADER_BYTES + length]
    if checksum(data) != digest:
        raise ChecksumMismatch(f"slot at {offset} failed its checksum")
    return data
