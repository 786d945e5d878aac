"""The Serve request router (``router.replica_router``) over the real policy and state, with
Serve's replica objects faked: what it keeps before the request goes and what after."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import NamedTuple

import pytest

from router.policy import RoutingRequest, RoutingState
from router.policy import state as routing_state
from router.replica_router import PDRequestRouter

CT = 32


class ReplicaID(NamedTuple):  # Serve's is hashable too: its queue-length cache is keyed by it
    unique_id: str


def replica(name: str) -> SimpleNamespace:
    stats = {"node_id": "n1", "kv_events": f"tcp://{name}:1"}  # its engine publishes KV events
    return SimpleNamespace(replica_id=ReplicaID(name), node_id="n1", routing_stats=stats)


@pytest.fixture
def state() -> Iterator[RoutingState]:
    before = routing_state.current()
    st = RoutingState(CT)
    routing_state.install(st)
    yield st
    routing_state._current = before


def make_router() -> PDRequestRouter:
    router = PDRequestRouter.__new__(PDRequestRouter)  # Serve's own constructor needs a controller
    router._replica_queue_len_cache = {}
    router.initialize_state("kv_aware", "prefill")
    return router


def prompt(rid: str, tag: int, turns: int = 0) -> RoutingRequest:
    keys = tuple(bytes([tag, i]) * 8 for i in range(4 + turns))
    return RoutingRequest(rid, "prefill", len(keys) * CT + 5, keys)


async def choose(router: PDRequestRouter, replicas: list[SimpleNamespace], request: RoutingRequest) -> str:
    groups = await router.choose_replicas(replicas, SimpleNamespace(kwargs={"routing": request.encode()}))
    return str(groups[0][0].replica_id.unique_id)


def test_the_prompt_counts_as_cached_once_the_request_went_out(state: RoutingState) -> None:
    router, replicas, first = make_router(), [replica("a"), replica("b")], prompt("r1", 7)

    async def route() -> None:
        chosen = await choose(router, replicas, first)
        # Before the request goes: its work in flight, which the next decision reads; the
        # prompt's chunks are not in the index yet.
        assert state.queued_tokens(chosen) > 0 and state.engines.prefix_by_replica(first.chunk_keys) == {}
        await asyncio.sleep(0)  # the request went out; the loop runs what the router left for after
        assert state.engines.prefix_by_replica(first.chunk_keys) == {chosen: 4}
        assert state.decisions("r1")["prefill"].chosen == chosen

    asyncio.run(route())


def test_a_decision_before_the_loop_settled_the_last_one_still_sees_it(state: RoutingState) -> None:
    router, replicas = make_router(), [replica("a"), replica("b")]

    async def burst() -> None:
        chosen = await choose(router, replicas, prompt("r1", 7))
        state.finished("r1")
        follower = await choose(router, replicas, prompt("r2", 7, turns=2))  # no loop turn between
        assert follower == chosen  # the next request on the prefix joins it

    asyncio.run(burst())
