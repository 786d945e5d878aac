"""The prefill work one router has in flight, per replica: fresher than any load report,
and the one place that sees a replica fall behind while it is still working.

    dispatched(replica, id, tokens, predicted_s)   the request went there
    finished(id) -> (replica, predicted_s)          it answered, failed or was cancelled
    queued_tokens()                                 token-equivalents in flight, per replica
    late(replicas)                                  how far behind its predictions each is

Why ``late``: a replica's slowdown (``RateMeter``) learns from prefills once they answer.
A stall on the replica a router favours lands on every request sent there before the
first one answers: in bench.policies run 13 two requests half a second apart went to the
faster of two replicas, each predicted at 0.23-0.46 s, and both took 1.8 s; when the second
was routed the first was already twice its prediction. The oldest prefill still running
past its predicted time says so at once. Its ratio, elapsed over predicted, is a lower
bound on how late it will be, and everything queued behind it waits on it.

Only a clear multiple counts (``stall_ratio``, twice the prediction): short of it, a late
prefill is the ordinary spread of the predictions, which the slowdown already averages. In
the simulator (no stalls; batches that run a little long) 60% of decisions at 512 replicas
saw some replica past its prediction, at 1.27x in the median. Counting all of those sent
work away from warm caches: 0.7 points less SLO attainment at 512 replicas, and past
capacity at 64 (1.15x) a collapse from 82.7% to 16.5%. Counting from 2x: within 0.3 and 1.5
points of not counting at all (bench.sim, README).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class InFlight:
    def __init__(self, clock: Callable[[], float], stall_ratio: float = 2.0, grace_s: float = 0.05,
                 max_late: float = 4.0) -> None:
        """A prefill is late once it has taken ``stall_ratio`` times its prediction, beyond
        ``grace_s`` (the calls to and from the engine, outside the engine's own time);
        ``max_late``: the largest factor ``late`` gives (the slowdown's own bound)."""
        self._clock, self._ratio, self._grace, self._max = clock, stall_ratio, grace_s, max_late
        self._where: dict[str, tuple[str, int, float]] = {}  # id -> (replica, tokens, predicted s)
        self._queued: dict[str, int] = {}  # replica -> token-equivalents in flight
        # Per replica, its requests in dispatch order (the oldest first) with when each went
        # and when it counts as late; the earliest of those over all replicas, so a decision
        # with nothing late costs one comparison.
        self._order: dict[str, dict[str, tuple[float, float]]] = {}
        self._next_late = float("inf")

    def dispatched(self, replica: str, request_id: str, tokens: int, predicted_s: float) -> None:
        self.finished(request_id)  # a retry routed elsewhere moves the work with it
        self._where[request_id] = (replica, tokens, predicted_s)
        self._queued[replica] = self._queued.get(replica, 0) + tokens
        now = self._clock()
        late_at = now + predicted_s * self._ratio + self._grace
        order = self._order.setdefault(replica, {})
        if not order and late_at < self._next_late:
            self._next_late = late_at
        order[request_id] = (now, late_at)

    def finished(self, request_id: str) -> tuple[str, float] | None:
        """Forget the request; its replica and predicted time, where it was in flight."""
        where = self._where.pop(request_id, None)
        if where is None:
            return None
        replica, tokens, predicted_s = where
        self._queued[replica] = self._queued.get(replica, 0) - tokens
        order = self._order[replica]
        first = next(iter(order)) == request_id
        late_at = order.pop(request_id)[1]
        if first:
            if late_at <= self._next_late:  # it set the earliest: find the next
                self._next_late = min((next(iter(o.values()))[1] for o in self._order.values() if o),
                                      default=float("inf"))
            elif order and next(iter(order.values()))[1] < self._next_late:
                self._next_late = next(iter(order.values()))[1]
        return replica, predicted_s

    def queued_tokens(self) -> dict[str, int]:
        """Token-equivalents in flight per replica (read-only for callers)."""
        return self._queued

    def late(self, replicas: Sequence[str]) -> list[float] | None:
        """For each of ``replicas``, how many times its prediction its oldest prefill in flight
        has taken so far (less the grace), where it is late; 1.0 for the others; None when no
        replica anywhere is late (the common case)."""
        now = self._clock()
        if now < self._next_late:
            return None
        factors = []
        order_of, where, grace, most = self._order, self._where, self._grace, self._max
        for name in replicas:
            f = 1.0
            order = order_of.get(name)
            if order:
                rid, (sent, late_at) = next(iter(order.items()))
                if now > late_at:
                    predicted = where[rid][2]
                    f = (now - sent - grace) / predicted if predicted > 0.0 else most
                    f = f if f < most else most
            factors.append(f)
        return factors

    def retain(self, alive: set[str]) -> None:
        """Forget the replicas that are gone and their requests."""
        for rid in [rid for rid, (r, _, _) in self._where.items() if r not in alive]:
            self.finished(rid)
        for name in [r for r in self._queued if r not in alive]:
            del self._queued[name]
        for name in [r for r in self._order if r not in alive]:
            del self._order[name]
