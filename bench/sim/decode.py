"""A simulated decode replica: continuous batching, simulated one batch change at a time.

Every step emits one token for every sequence in the batch and takes

    decode_step_s + decode_seq_s * batch + decode_kv_token_s * KV tokens in the batch

which only changes when the batch does. So instead of one event per step, the replica keeps
an epoch (start time, step count at its start, step time) and wakes only at a batch change:

    epoch start (a step boundary) ---dt+join---|---dt---|---dt---| ... |---dt---| wake
      joiners enter here                                               a sequence's last
      (their KV load + tail compute make                               token: it leaves,
       the first step longer)                                          waiters are admitted

A sequence arriving mid-step joins at the next boundary. Admission: at most
``decode_max_seqs`` sequences, and their prompt + output tokens within ``decode_kv_tokens``
(reserved up front: no preemption is simulated). On joining, the sequence loads its prompt's
KV from the store (this node cheaper than another) and computes what the store lacks: the
partial last chunk and the first token, or everything after an eviction; that step emits
its second token. The KV tokens of the batch are taken at the epoch's start (they grow by
one per sequence per step; epochs are short under load).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bench.sim.events import EventLoop
from bench.sim.meter import SimWorkMeter
from bench.sim.profiles import CostModel
from bench.sim.store import KVStore
from bench.sim.workload import SimRequest
from kvstore.messages import ReplicaLoad


@dataclass
class DecodeSeq:
    request: SimRequest
    first_token_s: float
    on_done: Callable[[DecodeSeq], None]
    replica: str = ""
    node_tokens: int = 0  # prompt KV loaded from the store on this node
    remote_tokens: int = 0  # ... from another node
    compute_tokens: int = 0  # prompt tokens the decode engine computed itself
    start_step: int = 0
    finish_step: int = 0
    done_s: float = 0.0

    @property
    def kv_tokens(self) -> int:
        """What admission reserves: the prompt, the first token, every output token."""
        return self.request.prompt_tokens + self.request.output_tokens


class DecodeReplica:
    def __init__(self, name: str, node: str, cost: CostModel, store: KVStore, loop: EventLoop) -> None:
        self.name, self.node, self.cost = name, node, cost
        self.store, self.loop = store, loop
        self.meter = SimWorkMeter()
        self._waiting: deque[DecodeSeq] = deque()  # not admitted yet (batch or KV full)
        self._joining: list[DecodeSeq] = []  # admitted, enter at the next step boundary
        self._running: list[tuple[int, int, DecodeSeq]] = []  # heap of (finish step, order, seq)
        self._order = 0
        self._reserved = 0
        self._ctx_base = 0  # sum of (prompt + 1 - start step): batch KV at step s = base + batch * s
        # the current epoch
        self._step0, self._t0, self._first_dt, self._dt = 0, 0.0, 0.0, 0.0
        self._wake_pending, self._wake_step, self._version = False, 0, 0

    def busy(self) -> bool:
        """Whether it has sequences to step (a prefill replica on the same core slows then)."""
        return bool(self._running or self._joining)

    # -- arrivals and admission -------------------------------------------------------------

    def submit(self, seq: DecodeSeq) -> None:
        now = self.loop.now
        seq.replica = self.name
        self.meter.started(now, seq.request.prompt_tokens + 1)
        self._waiting.append(seq)
        self._admit()
        if not self._joining:
            return
        if self._running:
            self._schedule(self._completed(now) + 1)
        elif not self._wake_pending:  # idle: a step starts now
            self._epoch()

    def _admit(self) -> None:
        cap, limit = self.cost.decode_kv_tokens, self.cost.decode_max_seqs
        while self._waiting:
            seq = self._waiting[0]
            n = len(self._running) + len(self._joining)
            # one sequence larger than the whole cache still runs alone, rather than never
            if n and (n >= limit or self._reserved + seq.kv_tokens > cap):
                return
            self._waiting.popleft()
            self._reserved += seq.kv_tokens
            self._joining.append(seq)

    # -- epochs -----------------------------------------------------------------------------

    def _join(self, seq: DecodeSeq, step: int) -> float:
        """``seq`` enters the batch at ``step``: load its KV; returns the seconds that adds."""
        req, ct = seq.request, self.cost.chunk_tokens
        n = req.prompt_tokens + 1  # the prompt and the first token, from the prefill replica
        hit = self.store.fetch(self.node, req.keys, 0, (n - 1) // ct)
        seq.node_tokens, seq.remote_tokens = hit.same_node_chunks * ct, hit.remote_chunks * ct
        seq.compute_tokens = n - hit.chunks * ct
        seq.start_step, seq.finish_step = step, step + req.output_tokens - 1
        self._order += 1
        heapq.heappush(self._running, (seq.finish_step, self._order, seq))
        self._ctx_base += n - step
        self.meter.prefilled(n, seq.compute_tokens)
        return self.cost.load_s(seq.node_tokens, seq.remote_tokens) + seq.compute_tokens * self.cost.prefill_token_s

    def _epoch(self) -> None:
        """A step boundary at ``now``: joiners enter, the step time is set until the next change."""
        step = self._step0
        join_s = sum(self._join(seq, step) for seq in self._joining)
        self._joining.clear()
        if not self._running:
            return
        batch = len(self._running)
        self._dt = self.cost.decode_step_time(batch, self._ctx_base + batch * step)
        self._t0, self._first_dt = self.loop.now, self._dt + join_s
        self._schedule(self._running[0][0])

    def _end(self, step: int) -> float:
        """When step number ``step`` of the current epoch ends."""
        return self._t0 + self._first_dt + (step - self._step0 - 1) * self._dt

    def _completed(self, t: float) -> int:
        since = t - self._t0 - self._first_dt
        if since < 0:
            return self._step0
        return self._step0 + 1 + int(since / self._dt + 1e-9)

    def _schedule(self, step: int) -> None:
        if self._wake_pending and step >= self._wake_step:
            return
        self._wake_pending, self._wake_step = True, step
        self._version += 1
        version = self._version
        self.loop.at(self._end(step), lambda: self._wake(version))

    def _wake(self, version: int) -> None:
        if version != self._version:
            return  # superseded by an earlier boundary
        self._wake_pending = False
        step, now = self._wake_step, self.loop.now
        running = self._running
        while running and running[0][0] <= step:
            seq = heapq.heappop(running)[2]
            seq.done_s = now
            self._ctx_base -= seq.request.prompt_tokens + 1 - seq.start_step
            self._reserved -= seq.kv_tokens
            self.meter.ended(now)
            seq.on_done(seq)
        self._step0 = step
        self._admit()
        self._epoch()

    # -- what the router sees ---------------------------------------------------------------

    def load(self) -> ReplicaLoad:
        now, m = self.loop.now, self.meter
        batch = len(self._running)
        kv = self._ctx_base + batch * self._completed(now) if batch else 0
        return ReplicaLoad(self.name, self.node, running=batch, waiting=len(self._waiting) + len(self._joining),
                           kv_usage=min(1.0, kv / self.cost.decode_kv_tokens), inflight=m.inflight,
                           queued_tokens=m.queued_tokens, computed_tokens=m.computed_tokens, busy_s=m.busy_s(now))
