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


def test_the_prompt_counts_as_cached_once_the_request_went_out_and_before_the_next_decision(
        state: RoutingState) -> None:
    router = PDRequestRouter.__new__(PDRequestRouter)  # Serve's own constructor needs a controller
    router._replica_queue_len_cache = {}
    router.initialize_state("kv_aware", "prefill")
    replicas = [replica("a"), replica("b")]
    keys = tuple(bytes([7, i]) * 8 for i in range(4))
    request = RoutingRequest("r1", "prefill", 4 * CT + 5, keys)

    async def route() -> None:
        groups = await router.choose_replicas(replicas, SimpleNamespace(kwargs={"routing": request.encode()}))
        chosen = groups[0][0].replica_id.unique_id
        # Before the request goes: its work in flight, which the next decision reads; no
        # explanation, no cache entries yet.
        assert state.queued_tokens(chosen) > 0
        assert state.decisions("r1") == {} and state.engines.prefix_by_replica(keys) == {}
        await asyncio.sleep(0)  # the request went out; the loop runs what the router left for after
        assert state.decisions("r1")["prefill"].chosen == chosen
        assert state.engines.prefix_by_replica(keys) == {chosen: 4}
        state.finished("r1")
        follower = RoutingRequest("r2", "prefill", 6 * CT + 5, keys + (b"x" * 16, b"y" * 16))
        groups = await router.choose_replicas(replicas, SimpleNamespace(kwargs={"routing": follower.encode()}))
        assert groups[0][0].replica_id.unique_id == chosen  # the next request on the prefix joins it

    asyncio.run(route())
