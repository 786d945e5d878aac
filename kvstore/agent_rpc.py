"""The Store Agent's control wire: gRPC with msgpack bodies (no protoc step, no pickle).

Engines (spawned by vLLM, not Ray workers) reach their node's agent here to allocate and
commit slots. Reads need no call here: same-node readers map the segment and pin slots with
file locks; other nodes use a transport (``kvstore.transport``: the tcp slot server, or the
grpc transport's streaming methods, which share this server). Control methods are unary msgpack
maps; errors travel as gRPC status codes. Every call must carry the cluster's store token
(``kvstore.peer_auth``); the server may also be TLS-only.

    Allocate {lengths: [int]}                       -> {offsets: [int]}
    Commit   {entries: [[key, off, len, digest]],   -> {committed: int}
              replica?: bool}                         (replicas of chunks committed elsewhere)
    Abort    {offsets: [int]}                       -> {}
    Discard  {slots: [[off, key]]}                  -> {discarded: int}  (damaged chunks)
    Stats    {}                                     -> AgentStats fields
    Clear    {}                                     -> {cleared: int}
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from dataclasses import asdict
from typing import Any

import grpc
import msgpack

from kvstore.agent import AgentStats, CommitEntry, StoreAgent
from kvstore.logging import get_logger
from kvstore.peer_auth import PeerAuth
from kvstore.transport import TcpSlotServer, grpc_stream
from kvstore.transport.grpc_stream import CHANNEL_OPTIONS, SERVICE

log = get_logger(__name__)


class AgentUnavailable(Exception):
    """The agent could not be reached or refused the call."""


def _handlers(agent: StoreAgent) -> dict[str, Callable[[dict[str, Any]], Any]]:
    return {
        "Allocate": lambda m: {"offsets": agent.allocate(list(m["lengths"]))},
        "Commit": lambda m: {
            "committed": agent.commit([CommitEntry(*e) for e in m["entries"]], bool(m.get("replica")))
        },
        "Abort": lambda m: agent.abort(list(m["offsets"])) or {},
        "Discard": lambda m: {"discarded": agent.discard([(int(o), bytes(k)) for o, k in m["slots"]])},
        "Stats": lambda m: asdict(agent.snapshot()),
        "Clear": lambda m: {"cleared": agent.clear()},
    }


def serve(
    agent: StoreAgent, host: str, auth: PeerAuth, port: int = 0, threads: int = 8,
) -> tuple[grpc.Server, int]:
    """Start the agent's gRPC server; returns it and the bound port (0 = any free port)."""

    def wrap(fn: Callable[[dict[str, Any]], Any]) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                result = fn(msgpack.unpackb(request, raw=False) if request else {})
            except Exception as e:  # one bad call must not take the agent down
                log.warning("agent call failed: %s", e)
                context.abort(grpc.StatusCode.INTERNAL, str(e))
            return result if isinstance(result, bytes) else msgpack.packb(result)

        return call

    methods = {
        name: grpc.unary_unary_rpc_method_handler(wrap(fn))
        for name, fn in _handlers(agent).items()
    }
    methods.update(grpc_stream.handlers(agent))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads), options=CHANNEL_OPTIONS, interceptors=auth.interceptors(),
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    bound = auth.add_port(server, f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind the store agent to {host}:{port}")
    server.start()
    return server, bound


class AgentServers:
    """The agent's two listeners: gRPC (control + grpc transport) and the tcp slot server.
    Sets the agent's advertised addresses; ``stop`` closes both. With TLS the plaintext tcp
    slot server is not started (no data address: tcp readers miss and recompute)."""

    def __init__(self, agent: StoreAgent, host: str, auth: PeerAuth) -> None:
        self.grpc, port = serve(agent, host, auth)
        self.tcp = TcpSlotServer(agent, host, auth) if auth.tls is None else None
        agent.address = f"{host}:{port}"
        agent.data_address = f"{host}:{self.tcp.port}" if self.tcp else ""

    def stop(self, grace_s: float = 0.5) -> None:
        if self.tcp is not None:
            self.tcp.close()
        self.grpc.stop(grace=grace_s).wait()


class AgentClient:
    """Blocking client; every call has a deadline so a stuck agent becomes a miss."""

    def __init__(self, address: str, auth: PeerAuth, timeout_s: float = 2.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = auth.call_metadata()
        self._channel = auth.channel(address, CHANNEL_OPTIONS)

    def _call(self, method: str, body: dict[str, Any]) -> bytes:
        stub = self._channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            result: bytes = stub(msgpack.packb(body), timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise AgentUnavailable(f"{method} on {self.address}: {e.code().name}: {e.details()}") from e
        return result

    def allocate(self, lengths: list[int]) -> list[int]:
        return list(msgpack.unpackb(self._call("Allocate", {"lengths": lengths}))["offsets"])

    def commit(self, entries: list[CommitEntry], replica: bool = False) -> int:
        rows = [[e.key, e.offset, e.length, e.checksum] for e in entries]
        body: dict[str, Any] = {"entries": rows}
        if replica:
            body["replica"] = True
        return int(msgpack.unpackb(self._call("Commit", body))["committed"])

    def abort(self, offsets: list[int]) -> None:
        self._call("Abort", {"offsets": offsets})

    def discard(self, slots: list[tuple[int, bytes]]) -> int:
        reply = msgpack.unpackb(self._call("Discard", {"slots": [list(s) for s in slots]}))
        return int(reply["discarded"])

    def stats(self) -> AgentStats:
        return AgentStats(**msgpack.unpackb(self._call("Stats", {})))

    def clear(self) -> int:
        return int(msgpack.unpackb(self._call("Clear", {}))["cleared"])

    def close(self) -> None:
        self._channel.close()
