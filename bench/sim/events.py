"""The simulator's clock: a heap of (time, sequence number, callback).

The sequence number makes events at equal times run in the order they were scheduled, so a
run is a pure function of its inputs (no ordering by callback identity, no wall clock).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

Callback = Callable[[], None]


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callback]] = []
        self._seq = 0
        self.events = 0  # callbacks run so far: the sim's own work, for profiling

    def at(self, t: float, fn: Callback) -> None:
        """Run ``fn`` at simulated time ``t`` (never before now: the past cannot change)."""
        self._seq += 1
        heapq.heappush(self._heap, (t if t > self.now else self.now, self._seq, fn))

    def after(self, dt: float, fn: Callback) -> None:
        self.at(self.now + dt, fn)

    def run(self) -> None:
        heap, pop = self._heap, heapq.heappop
        while heap:
            t, _, fn = pop(heap)
            self.now = t
            self.events += 1
            fn()
