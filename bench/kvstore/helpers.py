"""Workload buffers and the helper processes of the store benchmark."""

from __future__ import annotations

import mmap
import os
import socket
from pathlib import Path

# A bare socket's fastest receive size here (steps of 32 KiB to 4 MiB measured side by side).
RECV_STEP = 128 << 10

REPO = Path(__file__).resolve().parents[2]

# A store agent on node "bench-A" (or the node given after the prefix), in its own process as
# on a real node.
AGENT_SCRIPT = """
import signal, sys, time
from kvstore.agent import StoreAgent
from kvstore.agent_rpc import AgentServers
from kvstore.peer_auth import PeerAuth
agent = StoreAgent(sys.argv[4] if len(sys.argv) > 4 else "bench-A", sys.argv[1], int(sys.argv[2]), sys.argv[3])
servers = AgentServers(agent, "127.0.0.1", PeerAuth.for_store(sys.argv[1], sys.argv[3]))
agent.tick()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the segment is unlinked below
print("ready", flush=True)
try:
    while True:
        time.sleep(1)
        agent.tick()
finally:
    servers.stop()
    agent.close()
"""

# The plainest socket server: op 1 = send n bytes, op 2 = receive n bytes and ack. It sends
# from distinct memory (a 256 MiB page-aligned buffer, walked through), as the store's agent
# does: resending one cache-hot MiB would measure the cache, not the path.
SOCKET_SERVER_SCRIPT = """
import mmap, os, socket
m = mmap.mmap(-1, 256 << 20)
m[:] = os.urandom(1 << 20) * 256
src = memoryview(m)
pos = 0
srv = socket.create_server(("127.0.0.1", 0))
print("ready", srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept()
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        c.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sink = memoryview(bytearray(RECV_STEP))
    while True:
        head = c.recv(9, socket.MSG_WAITALL)
        if len(head) < 9:
            break
        op, n = head[0], int.from_bytes(head[1:], "little")
        if op == 1:  # in 1 MiB calls: one huge sendall runs at half the speed here
            while n:
                k = min(n, 1 << 20, len(src) - pos)
                c.sendall(src[pos:pos + k])
                n -= k
                pos = (pos + k) % len(src)
        else:
            while n:
                n -= c.recv_into(sink, min(n, len(sink)))
            c.sendall(b"k")
    c.close()
""".replace("RECV_STEP", str(RECV_STEP))


class Workload:
    """``n`` chunks of ``size`` bytes drawn from a pool larger than the caches, and a
    destination buffer for gets (room for each chunk's slot header too).

    Both are page-aligned (anonymous mmaps), as an engine's large tensors are. With a
    malloc'd buffer (16 bytes past a page boundary) every copy from a page-aligned segment
    has its destination 16 bytes ahead of its source modulo 4 KiB, and memcpy runs at a third
    of its speed here (4K aliasing), which would measure the allocator, not the store."""

    def __init__(self, size: int, batch_bytes: int) -> None:
        self.size = size
        self.n = max(4, batch_bytes // size)
        blocks = self.n * size // (1 << 20) + 1
        pool = mmap.mmap(-1, blocks << 20)
        pool[:] = os.urandom(1 << 20) * blocks
        self.pool = memoryview(pool)
        self.dest = memoryview(mmap.mmap(-1, self.n * (size + 64)))

    def chunk(self, i: int) -> memoryview:
        return self.pool[i * self.size : (i + 1) * self.size]

    @property
    def total(self) -> int:
        return self.n * self.size

    @property
    def label(self) -> str:
        return f"{self.size >> 10} KiB" if self.size < (1 << 20) else f"{self.size >> 20} MiB"


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        n = sock.recv_into(view[pos:], min(len(view) - pos, RECV_STEP))
        if n == 0:
            raise ConnectionError("server closed")
        pos += n


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
