"""The Store Agent as a Ray actor: one per node, pinned there by the control plane.

A thin shell: it builds the node-local ``StoreAgent``, serves it over gRPC on the node's IP,
and registers it in Redis so engines on this node find the segment and engines elsewhere
find the address to pull from.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Any

import ray

from kvstore.agent import StoreAgent
from kvstore.agent_rpc import serve


class StoreAgentActor:
    def __init__(self, redis_url: str, capacity_bytes: int, prefix: str) -> None:
        node_id = ray.get_runtime_context().get_node_id()
        host = ray.util.get_node_ip_address()
        self._agent = StoreAgent(node_id, redis_url, capacity_bytes, prefix)
        self._server, port = serve(self._agent, host)
        self._agent.address = f"{host}:{port}"
        self._agent.register()
        # Re-register every second: a restarted (empty) Redis learns of the agent again
        # instead of every save failing with "no agent on this node" until a restart.
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._register_loop, daemon=True)
        self._heartbeat.start()

    def _register_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._agent.register()
            except Exception:  # Redis down: keep trying, saves fail over to recompute
                pass

    def info(self) -> dict[str, Any]:
        return asdict(self._agent.info())

    def stats(self) -> dict[str, Any]:
        return asdict(self._agent.snapshot())

    def clear(self) -> int:
        return self._agent.clear()

    def shutdown(self) -> None:
        """Stop serving, unregister and unlink the segment (idempotent)."""
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace=0.5).wait()
            self._server = None
            self._agent.close()
