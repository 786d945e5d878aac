"""A simulated prefill replica: vLLM's chunked prefill over a FIFO queue.

Each engine step fills a token budget (``max_num_batched_tokens``) from the head of the
queue: a request mid-prefill continues, the next ones start. A request that starts looks
up its prompt then (as vLLM's scheduler and the store connector do, not at routing time):

    own    leading chunks in this replica's own prefix cache        free
    store  next leading chunks in the store, this node / elsewhere  per-token load cost,
                                                                   added to this step
    rest   computed, at least the prompt's last token               per-token compute cost

    step time = prefill_step_s + prefill_token_s * tokens computed + loads started

A request finishes (its first token) at the end of the step that computes its last token;
its chunks then enter the own cache (reported as KV events, what vLLM's ``KVEventsConfig``
publisher sends the router), and the ones the store did not hold go to the store on this
node.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bench.sim.events import EventLoop
from bench.sim.lru import ChunkLRU
from bench.sim.meter import SimWorkMeter
from bench.sim.profiles import CostModel
from bench.sim.store import ChangeFn, KVStore
from bench.sim.workload import SimRequest
from kvstore.messages import ReplicaLoad


@dataclass
class PrefillJob:
    request: SimRequest
    on_done: Callable[[PrefillJob], None]
    started: bool = False
    remaining: int = 0  # tokens still to compute (set when the job starts)
    own_tokens: int = 0
    node_tokens: int = 0
    remote_tokens: int = 0
    compute_tokens: int = 0
    done_s: float = 0.0
    replica: str = ""


class PrefillReplica:
    def __init__(self, name: str, node: str, cost: CostModel, store: KVStore, loop: EventLoop,
                 on_cache_change: ChangeFn, speed: float = 1.0) -> None:
        """``on_cache_change(op, replica, keys)`` gets this replica's KV events: the chunks that
        entered (``stored``) or left (``removed``) its own cache, as vLLM publishes them.
        ``speed``: this replica's compute against the cost model's (0.5: it shares its core)."""
        self.name, self.node, self.cost, self.speed = name, node, cost, speed
        # set when a decode replica shares this replica's core: while it has work, this one
        # gets half the core
        self.core_neighbour_busy: Callable[[], bool] | None = None
        self.store, self.loop, self._events = store, loop, on_cache_change
        self.cache = ChunkLRU(cost.prefill_cache_chunks)
        self.meter = SimWorkMeter()
        self._queue: deque[PrefillJob] = deque()
        self._stepping = False
        self._kv_tokens = 0  # prompt tokens of started jobs: their blocks are pinned

    def submit(self, job: PrefillJob) -> None:
        job.replica = self.name
        self.meter.started(self.loop.now, job.request.prompt_tokens)
        self._queue.append(job)
        if not self._stepping:
            self._step()

    def _start(self, job: PrefillJob) -> float:
        """Resolve the job's caches now; returns the seconds its store loads take."""
        req, ct = job.request, self.cost.chunk_tokens
        limit = (req.prompt_tokens - 1) // ct  # whole chunks, and never the last token
        own = self.cache.prefix(req.keys[:limit])
        hit = self.store.fetch(self.node, req.keys, own, limit)
        job.own_tokens = own * ct
        job.node_tokens, job.remote_tokens = hit.same_node_chunks * ct, hit.remote_chunks * ct
        job.compute_tokens = job.remaining = req.prompt_tokens - max(own, hit.chunks) * ct
        job.started = True
        self._kv_tokens += req.prompt_tokens
        return self.cost.load_s(job.node_tokens, job.remote_tokens)

    def _step(self) -> None:
        budget, seqs = self.cost.max_num_batched_tokens, self.cost.prefill_max_seqs
        computed, load_s, taken = 0, 0.0, 0
        for job in self._queue:
            if budget <= 0 or taken >= seqs:
                break
            if not job.started:
                load_s += self._start(job)
            n = min(job.remaining, budget)
            job.remaining -= n
            budget -= n
            computed += n
            taken += 1
        self._stepping = True
        shared = self.core_neighbour_busy is not None and self.core_neighbour_busy()
        speed = self.speed / 2 if shared else self.speed
        self.loop.after(self.cost.prefill_step_time(computed, load_s, speed), self._step_done)

    def _step_done(self) -> None:
        now, q = self.loop.now, self._queue
        # FIFO budget filling: the jobs that finished are a prefix of the queue
        while q and q[0].started and q[0].remaining == 0:
            job = q.popleft()
            self._finish(job, now)
        self._stepping = False
        if q:
            self._step()

    def _finish(self, job: PrefillJob, now: float) -> None:
        req = job.request
        job.done_s = now
        added, evicted = self.cache.insert(req.keys)
        if added:
            self._events("stored", self.name, added)
        if evicted:
            self._events("removed", self.name, evicted)
        # the connector saves the chunks past the store's hit; ``save`` skips any held anywhere
        self.store.save(self.node, req.keys)
        self._kv_tokens -= req.prompt_tokens
        self.meter.prefilled(req.prompt_tokens, job.compute_tokens)
        self.meter.ended(now)
        job.on_done(job)

    def load(self) -> ReplicaLoad:
        now, m = self.loop.now, self.meter
        waiting = sum(1 for j in self._queue if not j.started)
        pool_tokens = self.cost.prefill_cache_chunks * self.cost.chunk_tokens
        return ReplicaLoad(self.name, self.node, running=len(self._queue) - waiting, waiting=waiting,
                           kv_usage=min(1.0, self._kv_tokens / pool_tokens),
                           inflight=m.inflight, queued_tokens=m.queued_tokens,
                           computed_tokens=m.computed_tokens, busy_s=m.busy_s(now),
                           kv_events="sim" if self.cost.prefill_cache_chunks else "")  # its cache reports changes
