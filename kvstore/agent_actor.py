"""The Store Agent as a Ray actor: one per node, pinned there by the control plane.

A thin shell: it builds the node-local ``StoreAgent``, serves it (gRPC control + the tcp slot
server) on the node's IP, and ticks it every second: heartbeat, re-publish after a Redis
restart, TTL expiry, reclaiming abandoned writes, reaping departed nodes.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Any

import ray

from kvstore import janitor
from kvstore.agent import AgentSettings, StoreAgent
from kvstore.agent_rpc import AgentServers
from kvstore.logging import get_logger
from kvstore.peer_auth import PeerAuth

log = get_logger(__name__)
JANITOR_EVERY_S = 30


class StoreAgentActor:
    def __init__(
        self, redis_url: str, capacity_bytes: int, prefix: str, settings: dict[str, Any] | None = None,
        tls: dict[str, str] | None = None,
    ) -> None:
        node_id = ray.get_runtime_context().get_node_id()
        host = ray.util.get_node_ip_address()
        self._agent = StoreAgent(node_id, redis_url, capacity_bytes, prefix, settings=AgentSettings(**(settings or {})))
        auth = PeerAuth.for_store(redis_url, prefix, tls)  # only peers with the cluster's token
        self._servers: AgentServers | None = AgentServers(self._agent, host, auth)
        self._agent.tick()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="pdkv-agent-tick", daemon=True)
        self._ticker.start()

    def _tick_loop(self) -> None:
        failures, ticks = 0, 0
        while not self._stop.wait(1.0):
            ticks += 1
            if ticks % JANITOR_EVERY_S == 0:
                self._sweep()
            try:
                self._agent.tick()
                if failures:
                    log.warning("store agent reaches Redis again after %d failed ticks", failures)
                failures = 0
            except Exception as e:  # Redis down: keep trying, saves fail over to recompute
                if failures % 30 == 0:
                    log.warning("store agent tick failed (%d in a row): %s", failures + 1, e)
                failures += 1

    def _sweep(self) -> None:
        """Free what engines killed on this node left in shared memory (kvstore.janitor)."""
        try:
            janitor.sweep()
        except Exception as e:  # never let housekeeping stop the agent
            log.warning("shared-memory sweep failed: %s", e)

    def info(self) -> dict[str, Any]:
        return asdict(self._agent.info())

    def stats(self) -> dict[str, Any]:
        return asdict(self._agent.snapshot())

    def clear(self) -> int:
        return self._agent.clear()

    def shutdown(self) -> None:
        """Stop serving, drop this node's chunks from Redis and unlink the segment (idempotent)."""
        self._stop.set()
        if self._servers is not None:
            self._servers.stop()
            self._servers = None
            self._agent.close()
