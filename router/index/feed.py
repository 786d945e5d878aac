"""Keeps a ``StoreIndex`` current from the store's change stream, on its own thread.

    start: resync (node sets in Redis) --> XREAD from the id the resync noted, blocking 1 s
           --> apply each event --> ... ; on a gap (the stream was trimmed past our last id)
           or after Redis was unreachable: resync again.

Every router replica runs its own feed, so replicas agree without talking to each other, and
no request ever waits on Redis. While Redis is down the index keeps its last state (routing
degrades to stale preferences, answers stay right: the engines check the store themselves).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvstore.logging import get_logger
from kvstore.metadata import MetadataStore
from router.index.store_index import StoreIndex, stream_id_after
from router.index.thread import FeedThread

log = get_logger(__name__)


class StoreIndexFeed(FeedThread):
    thread_name = "pd-store-index"

    def __init__(
        self, index: StoreIndex, meta_factory: Callable[[], MetadataStore], block_ms: int = 1000,
        retry_s: float = 1.0, on_tick: Callable[[MetadataStore], None] | None = None, tick_s: float = 5.0,
    ) -> None:
        """``meta_factory``'s client needs a socket timeout longer than ``block_ms``.
        ``on_tick(meta)`` runs on this thread about every ``tick_s`` (slow-moving inputs of
        the routing policy, such as the store's measured transfer costs)."""
        super().__init__()
        self.index = index
        self._on_tick, self._tick_s, self._next_tick = on_tick, tick_s, 0.0
        self._meta_factory = meta_factory
        self._block_ms = block_ms
        self._retry_s = retry_s
        self.healthy = False

    def _run(self) -> None:
        need_resync, failures = True, 0
        meta: MetadataStore | None = None
        while not self._stop.is_set():
            try:
                if meta is None:
                    meta = self._meta_factory()
                if need_resync or self._gap(meta):
                    self.index.resync(meta)
                    need_resync = False
                self.index.apply(meta.read_events(after=self.index.last_id, count=1000, block_ms=self._block_ms))
                if self._on_tick is not None and time.monotonic() >= self._next_tick:
                    self._next_tick = time.monotonic() + self._tick_s
                    self._on_tick(meta)
                if failures:
                    log.warning("store index feed reconnected after %d failures", failures)
                failures, self.healthy = 0, True
            except Exception as e:  # Redis down: keep the last state, resync when it is back
                if failures % 30 == 0:
                    log.warning("store index feed failed (%d in a row): %s", failures + 1, e)
                failures, self.healthy, need_resync = failures + 1, False, True
                if meta is not None:
                    meta.client.close()
                    meta = None
                self._stop.wait(self._retry_s)
        if meta is not None:
            meta.client.close()

    def _gap(self, meta: MetadataStore) -> bool:
        bounds = meta.stream_bounds()
        if bounds is None or self.index.last_id == "0-0":
            return False
        first, _last = bounds
        return stream_id_after(first, self.index.last_id) and first != self.index.last_id
