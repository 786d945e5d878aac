"""A named shared-memory segment holding KV chunks, and the slot format inside it.

The Store Agent creates the segment; engine processes on the same node map it by name and
read/write slots directly (no copy through a socket, no pickle). We map ``/dev/shm/<name>``
ourselves instead of using ``multiprocessing.shared_memory``: on Python 3.11 attaching through
that class registers the segment with the attaching process's resource tracker, which unlinks
it when that process exits, taking the agent's segment down with an engine.

Slot layout (every slot starts 64-byte aligned; the payload stays aligned too):

    0        8         24        32       40                64
    | magic  | key(16) | length  | crc32  |   reserved      | payload (length bytes) ...

A reader trusts a slot only if magic, key, length and crc32 all match what it expects, so a
slot that was evicted and reused under a reader is detected, never served.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass

HEADER_BYTES = 64
_MAGIC = b"PDKV0001"
_HEADER = struct.Struct("<8s16sQQ")  # magic, key, payload length, crc32
SHM_DIR = "/dev/shm"


class SlotCorrupt(Exception):
    """The slot does not hold the chunk the reader expected (evicted, reused, torn)."""


@dataclass(frozen=True)
class SlotHeader:
    key: bytes
    length: int
    crc32: int


def slot_bytes(payload_bytes: int) -> int:
    return HEADER_BYTES + payload_bytes


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

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        return cls(name, size, create=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        return cls(name, 0, create=False)

    def payload(self, offset: int, length: int) -> memoryview:
        start = offset + HEADER_BYTES
        return self.buf[start : start + length]

    def seal(self, offset: int, key: bytes, length: int) -> int:
        """Write the header after the payload is in place; returns the payload's crc32."""
        crc = zlib.crc32(self.payload(offset, length))
        _HEADER.pack_into(self.buf, offset, _MAGIC, key, length, crc)
        return crc

    def verify(self, offset: int, key: bytes, length: int, crc32: int) -> memoryview:
        """Return the payload if the slot holds exactly this chunk, else raise SlotCorrupt."""
        return check_slot(self.buf, offset, key, length, crc32)

    def still_holds(self, offset: int, key: bytes) -> bool:
        """Re-check after copying a payload out: eviction invalidates the header before it
        reuses a slot, so an unchanged header means the copy was not torn by a reuse."""
        magic, got_key, _, _ = _HEADER.unpack_from(self.buf, offset)
        return bool(magic == _MAGIC and got_key == key)

    def invalidate(self, offset: int) -> None:
        """Clear the header so no reader accepts the slot any more (called before reuse)."""
        self.buf[offset : offset + 8] = b"\0" * 8

    def close(self) -> None:
        self.buf.release()
        self._mmap.close()
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def check_slot(buf: memoryview, offset: int, key: bytes, length: int, crc32: int) -> memoryview:
    """The payload of the slot at ``offset`` of ``buf`` if it holds exactly the expected chunk.

    Works on a mapped segment and on slot bytes pulled from another node alike.
    """
    if offset < 0 or offset + HEADER_BYTES + length > len(buf):
        raise SlotCorrupt(f"slot {offset}+{length} is outside the buffer ({len(buf)} B)")
    magic, got_key, got_len, got_crc = _HEADER.unpack_from(buf, offset)
    if magic != _MAGIC or got_key != key or got_len != length or got_crc != crc32:
        raise SlotCorrupt(f"slot at {offset} holds another chunk (evicted or torn)")
    data = buf[offset + HEADER_BYTES : offset + HEADER_BYTES + length]
    if zlib.crc32(data) != crc32:
        raise SlotCorrupt(f"slot at {offset} failed its checksum")
    return data
