"""A simulated replica's work counters: ``kvstore.engine_host.WorkMeter`` on the sim clock.

Same fields, same moments: ``started`` when a call reaches the replica, ``prefilled`` at its
first token (computed = prompt tokens not found in any cache), ``ended`` when it returns;
busy seconds accumulate while at least one call is in flight. The real meter reads
``time.monotonic()``, so it cannot be driven by a simulated clock; this one is its twin.
"""

from __future__ import annotations


class SimWorkMeter:
    def __init__(self) -> None:
        self.inflight = self.queued_tokens = self.computed_tokens = 0
        self._busy_total, self._busy_since = 0.0, 0.0

    def started(self, now: float, n_prompt: int) -> None:
        if self.inflight == 0:
            self._busy_since = now
        self.inflight += 1
        self.queued_tokens += n_prompt

    def prefilled(self, n_prompt: int, computed: int) -> None:
        self.queued_tokens -= n_prompt
        self.computed_tokens += max(computed, 0)

    def ended(self, now: float) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._busy_total += now - self._busy_since

    def busy_s(self, now: float) -> float:
        return self._busy_total + (now - self._busy_since if self.inflight else 0.0)
