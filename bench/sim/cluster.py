"""A simulated pdserve cluster driven by the REAL routing code (``router.policy``).

    arrival --> observe(prefill loads, changed) --> policy.route --> state.routed --> PrefillReplica
    first token --> state.finished --> observe(decode loads, changed) --> policy.route
             (prefer_node = the prefill replica's node) --> state.routed --> DecodeReplica
    KVStore change --(feed lag)--> state.store.stored / removed     (the store feed thread)
    own cache change --(feed lag)--> state.engines.record / remove  (the KV-event feed thread)
    every stats period, per replica (out of phase): its ReplicaLoad, as record_routing_stats
                                                    reports it
    every costs period: state.costs.update(store counters)             (the feed's on_tick)

The calls and their order are those of ``router/app.py`` and ``router/replica_router.py``.
What a request router sees of each replica is what Serve gives it: the replica's last
routing-stats report (refreshed every ``stats_period_s``, Serve's
``request_routing_stats_period_s``), with ``inflight`` taken from Serve's queue-length cache,
which this router updates on every send and every completion (Ray 2.60
``on_send_request`` / ``decrement_queue_len_cache``), so it is exact.

Nodes have ``per_node`` replicas (8: a GPU node); prefill and decode replicas are interleaved
in the P:D ratio, so every node holds both roles and decode can be local to its prefill.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from bench.sim.decode import DecodeReplica, DecodeSeq
from bench.sim.events import EventLoop
from bench.sim.meter import SimWorkMeter
from bench.sim.metrics import RequestRecord
from bench.sim.prefill import PrefillJob, PrefillReplica
from bench.sim.profiles import CostModel
from bench.sim.store import KVStore
from bench.sim.workload import SimRequest
from kvstore.messages import ReplicaLoad
from router.policy import RoutingPolicy, RoutingRequest, RoutingState, make_policy


@dataclass(frozen=True)
class ClusterSpec:
    replicas: int
    prefill_parts: int = 1  # the P:D ratio, e.g. 1:1 or 3:1
    decode_parts: int = 1
    per_node: int = 8
    stats_period_s: float = 0.5
    costs_period_s: float = 5.0
    feed_lag_s: float = 0.0
    prefill_speeds: tuple[float, ...] = ()  # per prefill replica, in layout order (default 1.0)
    # (prefill index, decode index) pairs that share one CPU core: the prefill replica runs at
    # half speed while the decode replica has work (this machine's 2P+1D layout on 2 cores)
    shared_cores: tuple[tuple[int, int], ...] = ()

    def layout(self) -> list[tuple[str, str, str]]:
        """(replica name, node, role) for every replica: roles interleaved in the ratio."""
        p, total = self.prefill_parts, self.prefill_parts + self.decode_parts
        out = []
        for i in range(self.replicas):
            role = "prefill" if (i + 1) * p // total > i * p // total else "decode"
            out.append((f"{role}-{i:04d}", f"node-{i // self.per_node:03d}", role))
        roles = {role for _, _, role in out}
        if roles != {"prefill", "decode"}:
            raise ValueError(f"{self.replicas} replicas at P:D {self.prefill_parts}:{self.decode_parts} leave a pool "
                             "empty; use more replicas or another ratio")
        return out


class SimReplica(Protocol):
    name: str
    node: str
    meter: SimWorkMeter

    def load(self) -> ReplicaLoad: ...


class Pool:
    """One role's replicas and the ``ReplicaLoad`` list its request router is given: each
    replica's last report, with ``inflight`` kept exact (Serve's queue-length cache counts
    this router's sends and completions as they happen). Like ``PDRequestRouter``, it keeps
    the loads rebuilt since the last decision, for ``RoutingState.observe``'s ``changed``."""

    def __init__(self, role: str, replicas: Sequence[SimReplica]) -> None:
        self.role = role
        self.replicas = list(replicas)
        self.by_name = {r.name: i for i, r in enumerate(self.replicas)}
        self.loads = [r.load() for r in self.replicas]
        self._changed: list[ReplicaLoad] = list(self.loads)

    def report(self, i: int) -> None:
        """Replica ``i``'s periodic routing-stats report arrives."""
        self.loads[i] = self.replicas[i].load()
        self._changed.append(self.loads[i])

    def changed(self, i: int) -> None:
        """A call to replica ``i`` was sent or returned: its queue length changed."""
        old = self.loads[i]
        self.loads[i] = ReplicaLoad(old.replica, old.node_id, old.running, old.waiting, old.kv_usage,
                                    self.replicas[i].meter.inflight, old.queued_tokens, old.computed_tokens,
                                    old.busy_s, old.kv_events)
        self._changed.append(self.loads[i])

    def take_changed(self) -> list[ReplicaLoad]:
        out, self._changed = self._changed, []
        return out


class SimCluster:
    def __init__(self, spec: ClusterSpec, cost: CostModel, policy: str, seed: int) -> None:
        self.spec, self.cost, self.policy_name = spec, cost, policy
        self.loop = EventLoop()
        layout = spec.layout()
        self.state = RoutingState(cost.chunk_tokens, prefill_prior_tps=cost.prefill_tps(),
                                  clock=lambda: self.loop.now)
        self.store = KVStore(cost, sorted({node for _, node, _ in layout}), self._store_changed)
        prefill_layout = [(n, node) for n, node, r in layout if r == "prefill"]
        speeds = list(spec.prefill_speeds) + [1.0] * (len(prefill_layout) - len(spec.prefill_speeds))
        prefill = [PrefillReplica(n, node, cost, self.store, self.loop, self._engine_changed, speed)
                   for (n, node), speed in zip(prefill_layout, speeds, strict=False)]
        decode = [DecodeReplica(n, node, cost, self.store, self.loop) for n, node, r in layout if r == "decode"]
        for p, d in spec.shared_cores:
            prefill[p].core_neighbour_busy = decode[d].busy
        self.prefill = Pool("prefill", prefill)
        self.decode = Pool("decode", decode)
        rng = random.Random(f"policy-{seed}")
        self.policies: dict[str, RoutingPolicy] = {
            role: make_policy(policy, self.state, role, random.Random(rng.random())) for role in ("prefill", "decode")}
        self._seed = seed
        self.records: list[RequestRecord] = []
        self.decisions = 0
        self._pending: list[SimRequest] = []
        self._next = 0
        self._open = 0  # requests arrived and not finished

    # -- driving a run ------------------------------------------------------------------------

    def run(self, requests: Sequence[SimRequest]) -> list[RequestRecord]:
        self._pending = sorted(requests, key=lambda r: r.arrival_s)
        if self._pending:
            self.loop.at(self._reaches_router(self._pending[0]), self._arrive)
            phases = random.Random(f"stats-{self._seed}")
            for pool in (self.prefill, self.decode):
                for i in range(len(pool.replicas)):
                    self.loop.at(phases.uniform(0.0, self.spec.stats_period_s), partial(self._tick_stats, pool, i))
            self.loop.at(0.0, self._tick_costs)
        self.loop.run()
        return self.records

    def _active(self) -> bool:
        return self._next < len(self._pending) or self._open > 0

    def _tick_stats(self, pool: Pool, i: int) -> None:
        """Each replica reports on its own timer (Serve calls every replica's
        ``record_routing_stats`` from that replica's loop), so reports are out of phase."""
        pool.report(i)
        if self._active():
            self.loop.after(self.spec.stats_period_s, partial(self._tick_stats, pool, i))

    def _tick_costs(self) -> None:
        self.state.costs.update(self.store.stats, self.cost.chunk_tokens)
        if self._active():
            self.loop.after(self.spec.costs_period_s, self._tick_costs)

    def _store_changed(self, op: str, node: str, keys: list[bytes]) -> None:
        index = self.state.store
        self._feed(index.stored if op == "stored" else index.removed, node, keys)

    def _engine_changed(self, op: str, replica: str, keys: list[bytes]) -> None:
        index = self.state.engines
        self._feed(index.record if op == "stored" else index.remove, replica, keys)

    def _feed(self, apply: Callable[[str, list[bytes]], None], owner: str, keys: list[bytes]) -> None:
        """What the router's feed threads do with a change, ``feed_lag_s`` after it happened."""
        if self.spec.feed_lag_s > 0:
            self.loop.after(self.spec.feed_lag_s, lambda: apply(owner, keys))
        else:
            apply(owner, keys)

    # -- the request path (router/app.py + router/replica_router.py) ---------------------------

    def _route(self, pool: Pool, hint: RoutingRequest) -> int:
        changed = pool.take_changed()
        if changed:  # as PDRequestRouter.choose_replicas: only when a load was rebuilt
            self.state.observe(pool.role, pool.loads, changed)
        decision = self.policies[pool.role].route(hint, pool.loads)
        self.state.routed(hint, decision)
        self.state.settle()  # the request router runs it once the request went out
        self.decisions += 1
        return pool.by_name[decision.chosen]

    def _reaches_router(self, req: SimRequest) -> float:
        """The path outside the engines (``request_overhead_s``) is charged before routing:
        it delays the request, it does not hold a replica."""
        return req.arrival_s + self.cost.request_overhead_s

    def _arrive(self) -> None:
        req = self._pending[self._next]
        self._next += 1
        if self._next < len(self._pending):
            self.loop.at(self._reaches_router(self._pending[self._next]), self._arrive)
        self._open += 1
        i = self._route(self.prefill, RoutingRequest(req.rid, "prefill", req.prompt_tokens, req.keys))
        replica = self.prefill.replicas[i]
        assert isinstance(replica, PrefillReplica)
        replica.submit(PrefillJob(req, self._prefilled))
        self.prefill.changed(i)

    def _prefilled(self, job: PrefillJob) -> None:
        req = job.request
        self.prefill.changed(self.prefill.by_name[job.replica])
        self.state.finished(req.rid, job.done_s - self._reaches_router(req))  # as the ingress: the engine's time
        if req.output_tokens <= 1:
            self._record(job, None)
            return
        node = self.prefill.replicas[self.prefill.by_name[job.replica]].node
        i = self._route(self.decode, RoutingRequest(req.rid, "decode", req.prompt_tokens + 1, req.keys, node))
        replica = self.decode.replicas[i]
        assert isinstance(replica, DecodeReplica)
        replica.submit(DecodeSeq(req, job.done_s, lambda seq: self._record(job, seq)))
        self.decode.changed(i)

    def _record(self, job: PrefillJob, seq: DecodeSeq | None) -> None:
        req = job.request
        tpot = None if seq is None else (seq.done_s - job.done_s) / (req.output_tokens - 1)
        decode_node = ""
        if seq is not None:
            d = self.decode.by_name[seq.replica]
            self.decode.changed(d)
            decode_node = self.decode.replicas[d].node
        prefill_node = self.prefill.replicas[self.prefill.by_name[job.replica]].node
        self.records.append(RequestRecord(
            req.rid, req.arrival_s, req.prompt_tokens, req.output_tokens, job.done_s - req.arrival_s, tpot,
            job.own_tokens, job.node_tokens, job.remote_tokens, job.compute_tokens, job.replica,
            "" if seq is None else seq.replica, decode_node == prefill_node))
        self._open -= 1
