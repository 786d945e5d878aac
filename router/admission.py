"""Admission: how many requests one router replica takes at once, and the clear answer past it.

A request holds its slot from the moment its body is read until its last byte is sent
(a streamed response releases it when the stream ends, however it ends). Past the limit the
answer is an immediate 429 with ``Retry-After``, never an unbounded queue: the client backs
off, and the requests already admitted keep their latency. The engine pools have their own
bound (Serve's ``max_queued_requests`` per pool, also a 429: ``router.faults``).
"""

from __future__ import annotations

import math

from router.errors import Overloaded


class Admission:
    def __init__(self, max_inflight: int, retry_after_s: float = 1.0) -> None:
        self.max_inflight, self.retry_after_s = max_inflight, retry_after_s
        self.inflight = 0

    def admit(self) -> None:
        """Take a slot or raise ``Overloaded``; a taken slot must be given back by ``release``."""
        if self.inflight >= self.max_inflight:
            raise Overloaded(f"this router has {self.inflight} requests in flight (its limit); retry after "
                             f"{self.retry_after()} s", code="too_many_requests",
                             retry_after_s=self.retry_after())
        self.inflight += 1

    def release(self) -> None:
        self.inflight = max(self.inflight - 1, 0)

    def retry_after(self) -> int:
        return max(1, math.ceil(self.retry_after_s))
