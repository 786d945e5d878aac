"""A Store Agent served on loopback (gRPC control + tcp slot server), outside Ray."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvstore.agent import AgentSettings, StoreAgent
from kvstore.agent_rpc import AgentServers
from kvstore.peer_auth import PeerAuth

AgentFactory = Callable[..., StoreAgent]


@pytest.fixture
def make_agent(redis_url: str, prefix: str) -> Iterator[AgentFactory]:
    started: list[tuple[StoreAgent, AgentServers]] = []

    def make(node_id: str = "node-A", capacity: int = 64 << 20, **settings: float) -> StoreAgent:
        agent = StoreAgent(node_id, redis_url, capacity, prefix, settings=AgentSettings(**settings))
        servers = AgentServers(agent, "127.0.0.1", PeerAuth.for_store(redis_url, prefix))
        agent.tick()
        started.append((agent, servers))
        return agent

    yield make
    for agent, servers in started:
        servers.stop(0)
        agent.close()
