"""The decode replicas' tokens to the router replica that asked for them: one ZMQ connection
per (decode replica, router replica) pair, one message per engine step for all of a router's
requests on that replica.

Why not Serve's streamed handle call: there every delta is its own Ray object, reported by
the decode replica's core worker and resolved by the router's through two event loops:
~400 us of router CPU and ~170 us of the decode replica's a token on a 2-core machine, 2-3x
and 5x what this channel costs (``bench/stream``). Here a step's deltas of a router's
requests travel as one message; the router splits it into per-request queues.

What stays a Serve call: the decode itself (``decode_into``, unary). Routing, the replica's
queue length, cancellation (cancelling the call aborts the engine request) and a dead
replica's error all work as before; the call returns how many deltas it sent, so the router
knows when it has them all (the call's answer and the deltas take different roads).

Wire: PUSH (decode replica) -> PULL (router replica), each message two frames:
``[secret, msgpack([[request_id, EngineDelta bytes], ...])]``. The secret is 16 random bytes
per inbox, handed to the decode replica inside the Serve call (Ray's own channel); a message
without it is dropped and counted, so nothing else on the network can write into a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from kvstore.logging import get_logger

log = get_logger(__name__)

SECRET_BYTES = 16
# After the call said N deltas were sent, how long the last of them may still be on the way
# before the stream counts as broken (then resumed elsewhere, as for a lost replica).
LATE_GRACE_S = 5.0
# Messages (steps) queued for one router replica before the decode replica gives up on it
# (a router that is reachable but stopped reading).
SEND_HWM = 100_000
IDLE_CLOSE_S = 60.0  # a connection to a router replica unused this long is closed
# A router replica whose inbox the decode replica cannot reach this long (connection lost or
# never made) is gone: its process died, and its requests here are ended (Ray does not cancel
# a dead caller's calls to an actor).
RECONNECT_GRACE_S = 10.0
MAX_MESSAGE_BYTES = 64 << 20  # a step's deltas for one router are KiBs; anything larger is refused unread


class TokensLost(Exception):
    """The decode call finished but some of its deltas never arrived: the stream is broken,
    so the router resumes it elsewhere from the tokens it has."""


@dataclass(frozen=True)
class InboxAddress:
    endpoint: str  # tcp://<router node ip>:<port>
    secret: bytes

    def encode(self) -> bytes:
        return msgpack.packb([self.endpoint, self.secret])

    @classmethod
    def decode(cls, raw: bytes) -> InboxAddress:
        endpoint, secret = msgpack.unpackb(raw)
        return cls(endpoint, secret)


_END, _FAIL = object(), object()


class InboxStream:
    """One request's deltas, in order; ends after the count its call reported, or raises what
    the call raised (after the deltas that came before it)."""

    def __init__(self, inbox: TokenInbox, request_id: str) -> None:
        self._inbox, self.request_id = inbox, request_id
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._settle: asyncio.Future[Any] | None = None

    def put(self, raw: bytes) -> None:
        self._queue.put_nowait(raw)

    def ended(self, sent: int) -> None:
        self._queue.put_nowait((_END, sent))

    def failed(self, exc: BaseException) -> None:
        self._queue.put_nowait((_FAIL, exc))

    def settle_with(self, call: Any) -> None:
        """Report the awaitable ``call`` (the decode, answering the number of deltas sent) into
        this stream when it finishes."""

        async def settle() -> None:
            try:
                self.ended(int(await call))
            except asyncio.CancelledError:
                self.failed(asyncio.CancelledError())
            except Exception as e:
                self.failed(e)

        self._settle = asyncio.ensure_future(settle())

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for batch in self.batches():
            for raw in batch:
                yield raw

    async def batches(self) -> AsyncIterator[list[bytes]]:
        """The deltas in order, each time all that have arrived: one when the reader keeps
        up, several when it fell behind (the router then sends them as one chunk)."""
        seen, total = 0, None
        while total is None or seen < total:
            item = await self._next(seen, total)
            batch: list[bytes] = []
            while True:
                if isinstance(item, bytes):
                    batch.append(item)
                    seen += 1
                elif item[0] is _END:
                    total = item[1]
                else:
                    if batch:
                        yield batch  # what came before the failure first
                    raise item[1]
                if self._queue.empty() or (total is not None and seen >= total):
                    break
                item = self._queue.get_nowait()
            if batch:
                yield batch

    async def _next(self, seen: int, total: int | None) -> Any:
        """The next item; once the call has said how many it sent (``total``), within
        ``LATE_GRACE_S``."""
        if total is None:
            return await self._queue.get()
        try:
            async with asyncio.timeout(LATE_GRACE_S):
                return await self._queue.get()
        except TimeoutError:
            raise TokensLost(f"request {self.request_id}: {total - seen} of {total} deltas never "
                             f"arrived within {LATE_GRACE_S:g} s of the call's end") from None

    def close(self) -> None:
        self._inbox.forget(self.request_id)
        if self._settle is not None and not self._settle.done():
            self._settle.cancel()

    def __enter__(self) -> InboxStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _batch(payload: bytes) -> list[tuple[str, bytes]] | None:
    """A message's ``[[request_id, delta], ...]``, or None when it is anything else: a
    malformed message is refused whole, and never reaches a stream or stops the reader."""
    try:
        items = msgpack.unpackb(payload)
        batch = [(rid, raw) for rid, raw in items]
    except (ValueError, TypeError):
        return None
    if all(isinstance(rid, str) and isinstance(raw, bytes) for rid, raw in batch):
        return batch
    return None


class TokenInbox:
    """The router replica's end: binds one PULL socket, hands out its address, and sorts each
    message's deltas into the open streams (a delta for a stream no longer open is dropped:
    a cancelled request, or one resumed elsewhere under another id)."""

    def __init__(self, host: str) -> None:
        self._ctx = zmq.asyncio.Context()  # its own: a shared instance may be a plain (blocking) one
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = InboxAddress(f"tcp://{host}:{port}", os.urandom(SECRET_BYTES))
        self._encoded = self.address.encode()
        self._streams: dict[str, InboxStream] = {}
        self.messages = self.deltas = self.dropped = self.rejected = 0
        self._reader = asyncio.ensure_future(self._read())

    @property
    def encoded_address(self) -> bytes:
        return self._encoded

    def counters(self) -> dict[str, int]:
        return {"messages": self.messages, "deltas": self.deltas, "dropped": self.dropped, "rejected": self.rejected}

    def open(self, request_id: str) -> InboxStream:
        stream = InboxStream(self, request_id)
        self._streams[request_id] = stream
        return stream

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def deliver(self, frames: list[bytes]) -> None:
        """Sort one message into the streams (the reader's step; tests call it directly)."""
        if len(frames) != 2 or not hmac.compare_digest(frames[0], self.address.secret):
            self.rejected += 1
            if self.rejected == 1:
                log.warning("token inbox %s: dropped a message without this inbox's secret", self.address.endpoint)
            return
        batch = _batch(frames[1])
        if batch is None:
            self.rejected += 1
            return
        self.messages += 1
        for rid, raw in batch:
            stream = self._streams.get(rid)
            if stream is None:
                self.dropped += 1
                continue
            self.deltas += 1
            stream.put(raw)

    async def _read(self) -> None:
        while True:
            try:
                frames = await self._sock.recv_multipart(copy=True)
            except zmq.ZMQError as e:
                if self._sock.closed:
                    return
                log.warning("token inbox %s: receive failed: %s", self.address.endpoint, e)
                await asyncio.sleep(0.1)
                continue
            self.deliver(frames)

    def close(self) -> None:
        self._reader.cancel()
        self._sock.close(linger=0)
        self._ctx.term()


class _Route:
    """One router replica's connection, watched: a router that stays unreachable for
    ``RECONNECT_GRACE_S`` (its process died: nothing listens at its port any more) is gone.
    The watch is read at each send, a non-blocking look at ZMQ's monitor events."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, now: float) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self._events = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.used = now
        self._down_since: float | None = now  # not connected yet

    def reachable(self, now: float) -> bool:
        while True:
            try:
                event = recv_monitor_message(self._events, flags=zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            if event == zmq.EVENT_CONNECTED:
                self._down_since = None
            elif event == zmq.EVENT_DISCONNECTED and self._down_since is None:
                self._down_since = now
        return self._down_since is None or now - self._down_since < RECONNECT_GRACE_S

    def close(self) -> None:
        self.sock.disable_monitor()
        self._events.close(linger=0)
        self.sock.close(linger=0)


class TokenOutbox:
    """The decode replica's end: one PUSH socket per router replica it serves, and the deltas
    produced in one pass of the event loop (one engine step's outputs wake every request's
    generator in that pass) sent as one message per router replica."""

    def __init__(self) -> None:
        self._ctx = zmq.Context()
        self._routes: dict[InboxAddress, _Route] = {}
        self._pending: dict[InboxAddress, list[list[Any]]] = {}
        self._gone: dict[InboxAddress, str] = {}  # router replicas found gone, and why
        self._flush_scheduled = False
        self.messages = self.deltas = 0

    async def relay(self, address: InboxAddress, request_id: str, items: AsyncGenerator[bytes, None]) -> int:
        """Send every item of ``items`` (encoded deltas) to ``address`` for ``request_id``;
        the number sent. An error of ``items`` propagates; what came before it is still sent."""
        sent = 0
        async with contextlib.aclosing(items):  # ended early (a gone router): the engine's request too
            async for raw in items:
                self.put(address, request_id, raw)
                sent += 1
        # The last deltas go with the step's flush, with the other requests' (a step often ends
        # many requests at once). The answer may reach the router before them: it waits for
        # the count.
        return sent

    def put(self, address: InboxAddress, request_id: str, raw: bytes) -> None:
        if address in self._gone:  # its router is gone: end the request (the caller aborts the engine's)
            raise ConnectionError(f"router inbox {address.endpoint} is gone ({self._gone[address]})")
        self._pending.setdefault(address, []).append([request_id, raw])
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        now = time.monotonic()
        for address, batch in pending.items():
            if address in self._gone:
                continue
            route = self._route(address, now)
            if not route.reachable(now):
                self._lost(address, f"unreachable for {RECONNECT_GRACE_S:g} s")
                continue
            try:
                route.sock.send_multipart([address.secret, msgpack.packb(batch)], flags=zmq.NOBLOCK)
            except zmq.Again:
                self._lost(address, f"{SEND_HWM} steps unread")
                continue
            self.messages += 1
            self.deltas += len(batch)

    def _lost(self, address: InboxAddress, why: str) -> None:
        """That router replica is gone, and so are its requests here: each fails at its next
        delta, and its engine request is aborted."""
        log.warning("router inbox %s is gone (%s); ending its requests here", address.endpoint, why)
        self._gone[address] = why
        self._routes.pop(address).close()

    def _route(self, address: InboxAddress, now: float) -> _Route:
        route = self._routes.get(address)
        if route is None:
            self._close_idle(now)
            route = self._routes[address] = _Route(self._ctx, address.endpoint, now)
        route.used = now
        return route

    def _close_idle(self, now: float) -> None:
        for address, route in list(self._routes.items()):
            if now - route.used > IDLE_CLOSE_S:
                route.close()
                del self._routes[address]

    def close(self) -> None:
        for route in self._routes.values():
            route.close()
        self._routes.clear()
        self._ctx.term()
