"""The data paths the store is measured against, behind one small interface.

Each method moves the same ``n`` chunks of ``size`` bytes: ``put`` from the workload's pool,
``get`` into the workload's destination buffer (verified where the method verifies), so every
get ends with the bytes in the caller's memory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

from bench.kvstore.helpers import AGENT_SCRIPT, REPO, SOCKET_SERVER_SCRIPT, Workload, recv_exact


class Method:
    name = ""
    cross_node = False  # a reader pulling from a serving process, as from another node

    def __init__(self, w: Workload) -> None:
        self.w = w

    def before_put(self) -> None:
        """Untimed: make room for a fresh put."""

    def put(self) -> None:
        raise NotImplementedError

    def before_get(self) -> None:
        """Untimed: make sure a get really moves the bytes (no cache left by the last one)."""

    def get(self, k: int) -> float | None:
        """Get the first ``k`` chunks; may return its own timing (seconds) when the work runs
        elsewhere (a Ray actor on another node)."""
        raise NotImplementedError

    def close(self) -> None:
        return None


class Memcpy(Method):
    name = "memcpy"

    def put(self) -> None:
        self.get(self.w.n)

    def get(self, k: int) -> None:
        w = self.w
        for i in range(k):
            w.dest[i * w.size : (i + 1) * w.size] = w.chunk(i)


class _Process:
    """A helper process that prints ``ready ...`` when it serves."""

    def __init__(self, argv: list[str], cpus: set[int] | None = None) -> None:
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=pin)
        assert self.proc.stdout is not None
        self.words = self.proc.stdout.readline().split()
        if not self.words or self.words[0] != "ready":
            self.close()
            raise RuntimeError(f"{argv[:3]} did not start")

    def close(self) -> None:
        self.proc.terminate()  # the agent unlinks its segment on SIGTERM; kill would leak it
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Store(Method):
    """pdserve's store: an agent in its own process (node "bench-A"); the client on the same
    node (shm) or on another node (tcp, grpc)."""

    def __init__(self, w: Workload, redis_url: str, transport: str, serve_cpus: set[int] | None = None) -> None:
        from kvstore.agent_rpc import AgentClient
        from kvstore.client import StoreClient
        from kvstore.peer_auth import PeerAuth

        super().__init__(w)
        self.name = transport
        self.cross_node = transport != "shm"
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        capacity = 2 * w.n * (w.size + 128)
        self.agent_proc = _Process([sys.executable, "-c", AGENT_SCRIPT, redis_url, str(capacity), prefix],
                                   serve_cpus if self.cross_node else None)
        node = "bench-A" if transport == "shm" else "bench-B"
        self.client = StoreClient(redis_url, prefix, node, transport="tcp" if transport == "shm" else transport)
        info = self.client.meta.agent("bench-A")
        assert info is not None
        self.agent = AgentClient(info.address, PeerAuth.for_store(redis_url, prefix))
        self.keys = [uuid.uuid4().bytes for _ in range(w.n)]
        self.locs: list[Any] = []

    def before_put(self) -> None:
        self.agent.clear()

    def put(self) -> None:
        from kvstore.client import ChunkToSave

        w = self.w
        stored = self.client.batch_put([ChunkToSave(k, w.size) for k in self.keys],
                                       lambda i, v: v.__setitem__(slice(None), w.chunk(i)), node_id="bench-A")
        assert stored == w.n, f"stored {stored} of {w.n}"
        self.locs = [loc for loc in self.client.lookup(self.keys) if loc]

    def get(self, k: int) -> None:
        ok = self.client.batch_get(self.keys[:k], self.locs[:k], lambda i, p: None, self.w.dest)
        assert all(ok), f"{self.name}: a get failed"

    def close(self) -> None:
        self.client.close()
        self.agent.close()
        self.agent_proc.close()


class RawTcp(Method):
    """A plain loopback socket to another process: the limit of the cross-node path."""

    name = "raw-tcp"
    cross_node = True

    def __init__(self, w: Workload, serve_cpus: set[int] | None = None) -> None:
        super().__init__(w)
        self.server = _Process([sys.executable, "-c", SOCKET_SERVER_SCRIPT], serve_cpus)
        self.sock = socket.create_connection(("127.0.0.1", int(self.server.words[1])))
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def put(self) -> None:
        w = self.w
        self.sock.sendall(b"\x02" + w.total.to_bytes(8, "little"))
        for i in range(w.n):
            self.sock.sendall(w.chunk(i))
        assert self.sock.recv(1) == b"k"

    def get(self, k: int) -> None:
        w = self.w
        self.sock.sendall(b"\x01" + (k * w.size).to_bytes(8, "little"))
        recv_exact(self.sock, w.dest[: k * w.size])

    def close(self) -> None:
        self.sock.close()
        self.server.close()


class RedisBlob(Method):
    """The chunk as a Redis value."""

    name = "redis"

    def __init__(self, w: Workload, redis_url: str) -> None:
        import redis

        super().__init__(w)
        self.r = redis.Redis.from_url(redis_url)
        self.names = [f"bench:blob:{uuid.uuid4().hex[:8]}:{i}" for i in range(w.n)]

    def put(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        for i, name in enumerate(self.names):
            pipe.set(name, bytes(self.w.chunk(i)))
        pipe.execute()

    def get(self, k: int) -> None:
        w = self.w
        for i, value in enumerate(self.r.mget(self.names[:k])):
            w.dest[i * w.size : (i + 1) * w.size] = value

    def close(self) -> None:
        self.r.delete(*self.names)
        self.r.close()


class RayObjects(Method):
    """Ray's object store: ``ray.put`` on this node; ``ray.get`` here (same node: a zero-copy
    view of plasma, then the copy out) or in an actor on another node (the object manager
    pulls it over)."""

    def __init__(self, w: Workload, fetcher: Any = None) -> None:
        super().__init__(w)
        self.name = "ray" if fetcher is None else "ray-remote"
        self.fetcher = fetcher
        self.refs: list[Any] = []

    def put(self) -> None:
        import numpy as np
        import ray

        w = self.w
        self.refs = [ray.put(np.frombuffer(w.chunk(i), dtype=np.uint8)) for i in range(w.n)]

    def before_get(self) -> None:
        if self.fetcher is not None:  # the remote node caches what it fetched: new objects
            self.put()

    def get(self, k: int) -> float | None:
        import ray

        if self.fetcher is not None:
            seconds: float = ray.get(self.fetcher.fetch.remote(self.refs[:k]))
            return seconds
        w = self.w
        for i, arr in enumerate(ray.get(self.refs[:k])):
            w.dest[i * w.size : (i + 1) * w.size] = memoryview(arr)
        return None

    def close(self) -> None:
        self.refs.clear()


class Fetcher:
    """Runs on the other Ray node: gets objects and copies them out, timing just that."""

    def __init__(self, size: int) -> None:
        self.dest = memoryview(bytearray(size))

    def fetch(self, refs: list[Any]) -> float:
        import ray

        started = time.perf_counter()
        pos = 0
        for arr in ray.get(refs):
            n = arr.nbytes
            if pos + n > len(self.dest):
                pos = 0
            self.dest[pos : pos + n] = memoryview(arr)
            pos += n
        return time.perf_counter() - started
