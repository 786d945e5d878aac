"""What one router process knows beyond the replicas' load reports, shared by the request
routers of both pools and the ingress.

    StoreIndex        which store node holds which chunk      (feed thread: store stream)
    EngineCacheIndex  which replica's own cache holds which   (feed thread: the engines'
                      chunk                                    KV events)
    RateMeter         each replica's measured prefill rate    (load reports: tokens / busy s)
    TransferCosts     seconds per token loaded, per path      (feed thread: store stats)
    InFlight          prefill work this router has in flight, (request router + ingress)
                      and how late each replica runs
    decisions         the last routing decisions, to explain  (request router)

Serve builds the request router inside the deployment handle, in the router replica's
process, from import-path kwargs; it cannot be handed an object. So the ingress registers
this state once per process (``install``) and the request routers pick it up (``current``).
Everything here is memory only; writers from other threads take the indexes' locks.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvstore.messages import ReplicaLoad
from router.index import StoreIndex
from router.index.engine_feed import EngineEventFeed
from router.index.owners import ENGINE, OwnerIndex
from router.policy.inflight import InFlight
from router.policy.interface import RouteDecision, RoutingRequest


class EngineCacheIndex:
    """Chunks each prefill replica's own engine cache holds, from its KV events
    (``router.index.EngineEventFeed``); empty for engines without a prefix cache. LRU-bounded;
    an entry that is stale costs a missed preference, never a wrong answer. The replicas are
    owners of kind ``ENGINE`` in a table shared with the store index (``RoutingState``)."""

    def __init__(self, max_chunks: int = 1_000_000, owners: OwnerIndex | None = None,
                 lock: threading.Lock | None = None) -> None:
        if (owners is None) != (lock is None):
            raise ValueError("a shared owner table comes with the lock that guards it")
        self._owners = owners if owners is not None else OwnerIndex(max_chunks, kinds=2)
        self._lock = lock or threading.Lock()

    def record(self, replica: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._owners.add(replica, keys, ENGINE)

    def remove(self, replica: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._owners.remove(replica, keys, ENGINE)

    def forget(self, replica: str) -> None:
        with self._lock:
            self._owners.drop_owner(replica, ENGINE)

    def replicas(self) -> list[str]:
        with self._lock:
            return self._owners.owner_names(ENGINE)

    def __len__(self) -> int:
        return self._owners.count(ENGINE)

    def prefix_by_replica(self, keys: Sequence[bytes]) -> dict[str, int]:
        with self._lock:
            return self._owners.prefix_depths(keys, ENGINE)


class RateMeter:
    """Prefill rate per replica: prompt tokens computed per busy second, over about its last
    ``window_s`` busy seconds of the replica's own cumulative counters (so batching and the
    machine's real speed are in it), divided by the replica's slowdown (below).

    Both sums decay with busy time and the rate is their ratio: a report period that covers
    a sliver of odd work (one short prompt, a batch that waited on a load) moves the estimate
    by its share of the time, not as a whole sample. A per-sample average of 0.5 s reports
    swung with each batch, and the router sent a replica far less than its share on a rate
    it showed for a few seconds (bench.policies, 2026-12-02: 33 tok/s trusted, 44 its mean).

    The slowdown is how much longer than predicted this router's prefills there actually
    took (``took``: the engine's own time against ``(queued + work) / rate`` at the
    decision), a geometric moving average of the ratio. A busy-time mean prices every
    prefill the same, but a replica that shares its core or GPU with another engine runs
    slower exactly while that engine is busy, and that is when a router sends it work: in
    bench.policies the prefill replica sharing a core with decode took 1.8-2.4x its
    predicted time on the requests it got mid-burst, and those were kv_aware's slowest.
    A replica that runs as predicted keeps a slowdown of 1."""

    def __init__(self, prior_tps: float, window_s: float = 10.0, min_busy_s: float = 0.05,
                 slowdown_weight: float = 0.2, slowdown_bounds: tuple[float, float] = (0.5, 4.0),
                 min_predicted_s: float = 0.02) -> None:
        self.prior_tps = prior_tps
        self._window, self._min_busy = window_s, min_busy_s
        self._weight, self._bounds, self._min_predicted = slowdown_weight, slowdown_bounds, min_predicted_s
        self._last: dict[str, tuple[int, float]] = {}
        self._sums: dict[str, tuple[float, float]] = {}  # decayed (tokens, busy seconds)
        self._measured: dict[str, float] = {}  # tokens / busy second
        self._slowdown: dict[str, float] = {}
        self._rate: dict[str, float] = {}  # what routing uses: measured (or the prior) / slowdown

    def observe(self, load: ReplicaLoad) -> None:
        last = self._last.get(load.replica)
        if last is None or load.busy_s < last[1]:  # first report, or the replica restarted
            self._last[load.replica] = (load.computed_tokens, load.busy_s)
            return
        d_tokens, d_busy = load.computed_tokens - last[0], load.busy_s - last[1]
        if d_busy < self._min_busy or d_tokens <= 0:
            return
        keep = math.exp(-d_busy / self._window)
        tokens, busy = self._sums.get(load.replica, (0.0, 0.0))
        tokens, busy = tokens * keep + d_tokens, busy * keep + d_busy
        self._sums[load.replica] = (tokens, busy)
        self._measured[load.replica] = tokens / busy
        self._last[load.replica] = (load.computed_tokens, load.busy_s)
        self._rerate(load.replica)

    def took(self, replica: str, predicted_s: float, engine_s: float) -> None:
        """A prefill routed to ``replica`` took ``engine_s`` in its engine (queue and
        compute), where the decision predicted ``predicted_s``. Predictions under
        ``min_predicted_s`` (one-token probes) carry fixed costs more than rate: skipped.
        One sample moves the slowdown by at most a factor of 2 ** weight."""
        if predicted_s < self._min_predicted or engine_s <= 0.0:
            return
        ratio = min(2.0, max(0.5, engine_s / predicted_s))
        lo, hi = self._bounds
        slowdown = self._slowdown.get(replica, 1.0) * ratio ** self._weight
        self._slowdown[replica] = min(hi, max(lo, slowdown))
        self._rerate(replica)

    def _rerate(self, replica: str) -> None:
        self._rate[replica] = self._measured.get(replica, self.prior_tps) / self._slowdown.get(replica, 1.0)

    def rate(self, replica: str) -> float:
        return self._rate.get(replica, self.prior_tps)

    def table(self) -> dict[str, float]:
        """The rates routing uses (read-only for callers; replicas missing are at the prior)."""
        return self._rate

    def measured(self, replica: str) -> float | None:
        """The windowed rate from the replica's counters, before its slowdown."""
        return self._measured.get(replica)

    def slowdown(self, replica: str) -> float:
        return self._slowdown.get(replica, 1.0)

    def mean(self, replica: str) -> float | None:
        """The replica's rate over its whole life so far (computed tokens / busy seconds),
        for replaying a whole run; routing uses the windowed rate, which follows changes."""
        last = self._last.get(replica)
        return last[0] / last[1] if last and last[1] >= self._min_busy else None

    def counted(self, replica: str) -> tuple[int, float] | None:
        """The replica's counters as last reported: (computed tokens, busy seconds) since it
        started. Two snapshots give the rate between them (bench.policies leaves its warm-up out)."""
        return self._last.get(replica)

    def retain(self, alive: set[str]) -> None:
        """Forget the replicas that are gone."""
        for table in (self._last, self._sums, self._measured, self._slowdown, self._rate):
            for name in [name for name in table if name not in alive]:
                del table[name]


@dataclass
class TransferCosts:
    """Seconds per prompt token loaded from the store, same node (shared memory) and from
    another node; priors until the store's own transfer stats say otherwise."""

    same_node_s_per_token: float = 2e-6
    remote_s_per_token: float = 2e-5

    def load_s(self, node_tokens: float, remote_tokens: float) -> float:
        """How long loading that many stored tokens takes (from the replica's node, from others)."""
        return node_tokens * self.same_node_s_per_token + remote_tokens * self.remote_s_per_token

    def update(self, stats: Mapping[str, int], chunk_tokens: int) -> None:
        """From the store's counters (``kvstore.stats``: per-transport get latency sums and
        chunk counts), over the whole run so far."""
        for attr, transport, chunks in (("same_node_s_per_token", "shm", "loaded_local_chunks"),
                                        ("remote_s_per_token", None, "loaded_remote_chunks")):
            n = stats.get(chunks, 0)
            if transport is None:
                us = sum(v for k, v in stats.items() if k.startswith("get_seconds:") and k.endswith("_sum_us")
                         and not k.startswith("get_seconds:shm"))
            else:
                us = stats.get(f"get_seconds:{transport}_sum_us", 0)
            if n >= 8 and us > 0:
                setattr(self, attr, us * 1e-6 / (n * chunk_tokens))


class RoutingState:
    def __init__(self, chunk_tokens: int, prefill_prior_tps: float = 350.0, max_chunks: int = 1_000_000,
                 keep_decisions: int = 1024, shared_routers: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.chunk_tokens = chunk_tokens
        # Several router replicas send to the same pools: a replica's report of its queued
        # work (a period old) is then the only view of the other routers' requests.
        self.shared_routers = shared_routers
        # One table for both indexes (router.index.owners): one walk per request answers both;
        # ``max_chunks`` bounds the chunks either holds (a chunk in both counts once).
        self._owners, self._index_lock = OwnerIndex(max_chunks, kinds=2), threading.Lock()
        self.store = StoreIndex(owners=self._owners, lock=self._index_lock)
        self.engines = EngineCacheIndex(owners=self._owners, lock=self._index_lock)
        self.rates = RateMeter(prefill_prior_tps)
        self.costs = TransferCosts()
        self.engine_feed: EngineEventFeed | None = None  # set by the ingress when it runs one
        self.inflight = InFlight(clock)  # clock: the simulator's, in bench.sim
        self._publishing: set[str] = set()  # prefill replicas whose engines publish KV events
        self._node_of: dict[str, str] = {}
        self._prefill_pool: frozenset[str] = frozenset()
        self._decisions: OrderedDict[str, dict[str, RouteDecision]] = OrderedDict()
        self._keep = keep_decisions
        self._unsettled: list[tuple[RoutingRequest, RouteDecision]] = []  # decided, bookkeeping to do
        self._pools: dict[str, Callable[[], list[ReplicaLoad]]] = {}

    @property
    def indexed_chunks(self) -> int:
        """Distinct chunks in the shared table (held by a store node, a replica, or both)."""
        return len(self._owners)

    def prefix_view(self, keys: Sequence[bytes]) -> tuple[dict[str, int], dict[str, int], int]:
        """How deep into ``keys`` each replica's own cache goes, each node's store goes
        (``prefix_by_replica``, ``store.prefix_by_node``), and the store as a whole
        (``store.stored_prefix``): one walk of the shared table."""
        if not keys:
            return {}, {}, 0
        with self._index_lock:
            return self._owners.engine_and_store_depths(keys)

    # -- prefill work in flight (this router's own view: fresher than any report) -----------

    def routed(self, request: RoutingRequest, decision: RouteDecision) -> None:
        """A request router decided. Before the request goes, only what the next decision
        reads: a prefill's work counted against the chosen replica until the ingress says
        it finished. The rest of the bookkeeping waits for ``settle``."""
        chosen = decision.chosen
        if request.role == "prefill" and chosen:
            work = decision.work_tokens
            self.dispatched(chosen, request.request_id,
                            work if work >= 0 else self._work_tokens(request, decision, chosen))
        self._unsettled.append((request, decision))

    def settle(self) -> None:
        """The rest of each decision's bookkeeping. The request router runs it once the
        request has gone out (``call_soon``) and again before its next decision, in case
        that comes first (a burst of requests on one loop turn); every reader here settles
        first. Two parts, together most of a decision's time before they moved here
        (bench.router), neither of which the request itself depends on:

        - The explanation is kept (``decisions``: the response's route header, errors, the
          debug endpoints). Keeping one lets the oldest of ``keep_decisions`` go, and
          freeing a decision made a thousand requests ago (its score table, tens of objects
          long out of the CPU's caches) took 6-8 us.
        - A prefill's prompt chunks count as in the chosen replica's own cache from now on
          (12-16 us for 32 chunks into a 100k-chunk table). Its engine will hold them once
          this prefill ran: the next request with the same prefix finds them there now, not
          after the prefill and a KV event (a burst of conversations on one system prompt
          went cold on whichever replica was not computing it: bench.policies run 8). The
          engine's events confirm them or take them back; a prefill that never runs leaves a
          missed preference, never a wrong answer. Only for engines that publish events: no
          event would ever take an entry back from the others.

        Ray Serve's prefix-aware router updates its tree after routing the same way
        (``on_request_routed``)."""
        if not self._unsettled:
            return
        pending, self._unsettled = self._unsettled, []
        for request, decision in pending:
            self.decided(request.request_id, decision)
            chosen = decision.chosen
            if request.role == "prefill" and chosen and request.chunk_keys and chosen in self._publishing:
                self.engines.record(chosen, request.chunk_keys)

    def _work_tokens(self, request: RoutingRequest, decision: RouteDecision, chosen: str) -> int:
        """What the request will occupy the replica for, in its prompt tokens: the tokens it
        computes, plus its store loads (they block the engine step) at the replica's rate."""
        terms = decision.terms_of(chosen)
        node, remote = terms.get("node_tokens", 0), terms.get("remote_tokens", 0)
        compute = request.num_prompt_tokens - terms.get("own_tokens", 0) - node - remote
        return int(compute + self.costs.load_s(node, remote) * self.rates.rate(chosen))

    def dispatched(self, replica: str, request_id: str, tokens: int) -> None:
        # The engine time this predicts (kv_aware's score less the store loads, which the
        # work tokens already hold at the replica's rate): held against what it took, and
        # against the time it has taken so far while it runs (``late``).
        self.inflight.finished(request_id)  # a retry: its earlier try is not queued ahead of it
        queued = self.inflight.queued_tokens().get(replica, 0)
        self.inflight.dispatched(replica, request_id, tokens, (queued + tokens) / self.rates.rate(replica))

    def finished(self, request_id: str, engine_s: float | None = None) -> None:
        """The prefill is over (answered, failed or cancelled); ``engine_s``: the engine's
        own time for it, where it answered (``RateMeter.took``)."""
        where = self.inflight.finished(request_id)
        if where is not None and engine_s is not None:
            self.rates.took(where[0], where[1], engine_s)

    def queued_tokens(self, replica: str) -> int:
        return self.inflight.queued_tokens().get(replica, 0)

    def queued_by_replica(self) -> dict[str, int]:
        """Prompt tokens in flight per replica (read-only for callers)."""
        return self.inflight.queued_tokens()

    def late(self, replicas: Sequence[str]) -> list[float] | None:
        """How far behind its predictions each replica runs now (``InFlight.late``)."""
        return self.inflight.late(replicas)

    # -- what the replicas report -----------------------------------------------------------

    def observe(self, role: str, loads: Sequence[ReplicaLoad],
                changed: Sequence[ReplicaLoad] | None = None) -> None:
        """A request router's view of its pool at routing time: ``loads`` is the whole pool
        (membership: a replica that is gone is forgotten; a restarted one comes back with a
        new name and an empty cache), ``changed`` the reports that are new since the last
        call (default: all of them) for rates, nodes and event feeds."""
        fresh = loads if changed is None else changed
        for load in fresh:
            self._node_of[load.replica] = load.node_id
        if role != "prefill":
            return
        for load in fresh:
            self.rates.observe(load)
            if load.kv_events:
                self._publishing.add(load.replica)
                if self.engine_feed is not None:
                    self.engine_feed.watch(load.replica, load.kv_events)
            else:
                self._publishing.discard(load.replica)
        members = self._prefill_pool  # a new replica always comes with a new report
        if len(loads) != len(members) or any(load.replica not in members for load in fresh):
            self._prefill_pool = frozenset(load.replica for load in loads)
            self.retire(self._prefill_pool)

    def watch_pool(self, role: str, loads: Callable[[], list[ReplicaLoad]]) -> None:
        """Register where a pool's current loads can be read (its request router)."""
        self._pools[role] = loads

    def pool_loads(self) -> dict[str, list[ReplicaLoad]]:
        """Each watched pool's replicas as last reported (a pool appears once its request
        router exists: after the first request routed to it)."""
        return {role: loads() for role, loads in self._pools.items()}

    def node_of(self, replica: str) -> str:
        return self._node_of.get(replica, "")

    # -- replicas that went away -----------------------------------------------------------

    def retire(self, live: Iterable[str]) -> None:
        """Forget prefill replicas that are gone (a restarted replica comes back with a new
        name and an empty cache)."""
        alive = set(live)
        for name in self.engines.replicas():
            if name not in alive:
                self.engines.forget(name)
        if self.engine_feed is not None:
            for name in self.engine_feed.watched():
                if name not in alive:
                    self.engine_feed.retire(name)
        self.inflight.retain(alive)
        self.rates.retain(alive)
        self._publishing &= alive

    def snapshot(self) -> dict[str, object]:
        """What this router has measured per replica (JSON-ready): node, prefill rate (absent
        while at the prior), work in flight; and the store's transfer costs."""
        rates, queued = self.rates.table(), self.inflight.queued_tokens()
        replicas: dict[str, dict[str, object]] = {}
        for name, node in self._node_of.items():
            row: dict[str, object] = {"node": node}
            if name in rates:
                row["prefill_tps"] = round(rates[name], 1)  # what routing uses
                measured, mean = self.rates.measured(name), self.rates.mean(name)
                if measured is not None:
                    row["prefill_tps_measured"] = round(measured, 1)
                if mean is not None:
                    row["prefill_tps_mean"] = round(mean, 1)
                row["prefill_slowdown"] = round(self.rates.slowdown(name), 3)
            counted = self.rates.counted(name)
            if counted is not None:
                row["prefill_counted"] = [counted[0], round(counted[1], 4)]
            if name in queued:
                row["queued_tokens"] = queued[name]
            replicas[name] = row
        return {"replicas": replicas, "prefill_prior_tps": self.rates.prior_tps,
                "same_node_s_per_token": self.costs.same_node_s_per_token,
                "remote_s_per_token": self.costs.remote_s_per_token}

    # -- explanations ----------------------------------------------------------------------

    def decided(self, request_id: str, decision: RouteDecision) -> None:
        self._decisions.setdefault(request_id, {})[decision.role] = decision
        self._decisions.move_to_end(request_id)
        while len(self._decisions) > self._keep:
            self._decisions.popitem(last=False)

    def decisions(self, request_id: str) -> dict[str, RouteDecision]:
        self.settle()
        return dict(self._decisions.get(request_id, {}))

    def recent(self, n: int) -> list[tuple[str, dict[str, RouteDecision]]]:
        self.settle()
        return list(self._decisions.items())[-n:]


_current: RoutingState | None = None


def install(state: RoutingState) -> None:
    """Make ``state`` this process's routing state (called by the ingress at start)."""
    global _current
    _current = state


def current() -> RoutingState | None:
    return _current
