"""Keeps the router's view of each prefill replica's own cache current from the engines' KV
events, on its own thread.

    replica seen (routing stats name its publisher) --watch--> connect the SUB socket
    recv [topic = replica name, seq, batch] --> BlockTranslator --> EngineCacheIndex
    seq gap (events lost: slow joiner, high-water mark) --> forget the replica's entries
    replica gone --retire--> disconnect, forget

One SUB socket for all replicas (ZMQ fans in; the topic says who sent a batch), touched only
by this thread: ``watch`` and ``retire`` hand their requests over a queue. Requests never wait
on it: the index is read under its own lock, and a lost event costs a missed preference,
never a wrong answer (the engines check their caches and the store themselves).
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from kvstore.hashing import KVNamespace
from kvstore.logging import get_logger
from router.index.engine_events import BlockTranslator, decode_batch
from router.index.thread import FeedThread

log = get_logger(__name__)


class CacheSink(Protocol):
    """Where the chunk keys go (``router.policy.state.EngineCacheIndex``)."""

    def record(self, replica: str, keys: list[bytes]) -> None: ...

    def remove(self, replica: str, keys: list[bytes]) -> None: ...

    def forget(self, replica: str) -> None: ...


class EngineEventFeed(FeedThread):
    thread_name = "pd-engine-events"

    def __init__(self, sink: CacheSink, namespace: KVNamespace, poll_ms: int = 200,
                 context: Callable[[], zmq.Context[Any]] = zmq.Context.instance) -> None:
        super().__init__()
        self.sink, self.namespace = sink, namespace
        self._poll_ms = poll_ms
        self._context = context
        self._requests: queue.SimpleQueue[tuple[str, str, str]] = queue.SimpleQueue()
        self._watched: dict[str, str] = {}  # replica -> endpoint (written by callers)
        self._translators: dict[str, BlockTranslator] = {}
        self._seq: dict[str, int] = {}
        self.batches = self.gaps = 0

    # -- any thread ----------------------------------------------------------------------

    def watch(self, replica: str, endpoint: str) -> None:
        """Subscribe to ``replica``'s publisher (idempotent; cheap when already watched)."""
        if self._watched.get(replica) != endpoint:
            self._watched[replica] = endpoint
            self._requests.put(("watch", replica, endpoint))

    def watched(self) -> list[str]:
        return list(self._watched)

    def retire(self, replica: str) -> None:
        endpoint = self._watched.pop(replica, None)
        if endpoint is not None:
            self._requests.put(("retire", replica, endpoint))

    # -- the feed thread -------------------------------------------------------------------

    def _run(self) -> None:
        sock = self._context().socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.LINGER, 0)
        try:
            while not self._stop.is_set():
                self._handle_requests(sock)
                if not sock.poll(self._poll_ms):
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_batch(frames)
        except Exception:  # never take the router down; routing falls back to the store view
            log.exception("engine event feed stopped")
        finally:
            sock.close(0)

    def _handle_requests(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                op, replica, endpoint = self._requests.get_nowait()
            except queue.Empty:
                return
            if op == "watch":
                sock.connect(endpoint)
                log.info("engine events: watching %s at %s", replica, endpoint)
            else:
                try:
                    sock.disconnect(endpoint)
                except zmq.ZMQError:
                    pass
                self._forget(replica)

    def _on_batch(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            return
        replica = frames[0].decode(errors="replace")
        if replica not in self._watched:
            return  # a retired replica's last words
        seq = int.from_bytes(frames[1], "big", signed=True)
        last = self._seq.get(replica)
        self._seq[replica] = seq
        if last is not None and seq != last + 1:
            self.gaps += 1  # lost events: what we know of this replica may be wrong
            self._forget(replica)
            self._seq[replica] = seq
        translator = self._translators.get(replica)
        if translator is None:
            translator = self._translators[replica] = BlockTranslator(self.namespace)
        delta = translator.apply(decode_batch(frames[2]))
        if delta.cleared:
            self.sink.forget(replica)
        if delta.removed:
            self.sink.remove(replica, list(delta.removed))
        if delta.stored:
            self.sink.record(replica, list(delta.stored))
        self.batches += 1

    def _forget(self, replica: str) -> None:
        self._translators.pop(replica, None)
        self._seq.pop(replica, None)
        self.sink.forget(replica)
