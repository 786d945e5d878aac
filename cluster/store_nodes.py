"""Store Agents follow the nodes: one per alive Ray node, also for nodes that join later.

A detached supervisor actor (no CPU) looks at the cluster's nodes every few seconds and
starts a pinned ``StoreAgentActor`` on every alive node that has none. A node that leaves
takes its agent with it; the other agents notice its expired liveness key in Redis and drop
its chunks (``MetadataStore.reap_dead_nodes``), so no reader is sent there again.

    pdserve up ──> start_store ──> StoreSupervisor ──(every 2 s)──> pdkv-agent-<node> per node
    pdserve down ─> stop_store ──> supervisor killed, then every agent shut down cleanly
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.log import get_logger

log = get_logger(__name__)

AGENT_NAMESPACE = "pdserve"
AGENT_PREFIX = "pdkv-agent-"
SUPERVISOR_NAME = "pdkv-supervisor"


@dataclass(frozen=True)
class StoreNodesSpec:
    redis_url: str
    capacity_bytes: int
    prefix: str
    agent_settings: dict[str, Any] = field(default_factory=dict)  # kvstore.agent.AgentSettings
    tls: dict[str, str] | None = None  # kvstore.peer_auth.TlsFiles: the agents serve gRPC over TLS only


def agent_name(node_id: str) -> str:
    return f"{AGENT_PREFIX}{node_id}"


def ensure_agents(spec: StoreNodesSpec, timeout_s: float = 60.0) -> list[str]:
    """Start an agent on every alive node that lacks one and wait until each serves.
    Returns the names of the agents of all alive nodes."""
    from kvstore.agent_actor import StoreAgentActor

    actor_cls = ray.remote(StoreAgentActor)
    names, handles = [], []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        name = agent_name(node["NodeID"])
        handle = actor_cls.options(
            name=name, namespace=AGENT_NAMESPACE, lifetime="detached", num_cpus=0, get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(spec.redis_url, spec.capacity_bytes, spec.prefix, spec.agent_settings, spec.tls)
        names.append(name)
        handles.append(handle)
    ray.get([h.info.remote() for h in handles], timeout=timeout_s)
    return names


def list_agents() -> list[str]:
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == AGENT_NAMESPACE and a["name"].startswith(AGENT_PREFIX)
    )


class StoreSupervisor:
    def __init__(self, spec: dict[str, Any], interval_s: float = 2.0) -> None:
        self._spec = StoreNodesSpec(**spec)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="pdkv-supervisor", daemon=True)
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.sync()
            except Exception as e:  # a node that is still coming up: try again next round
                log.warning("could not start store agents on every node yet: %s", e)

    def sync(self) -> list[str]:
        with self._lock:
            return ensure_agents(self._spec)

    def stop(self) -> None:
        self._stop.set()


def start_store(spec: StoreNodesSpec) -> list[str]:
    """Start the supervisor (idempotent) and the agents of the nodes alive now."""
    supervisor = ray.remote(StoreSupervisor).options(
        name=SUPERVISOR_NAME, namespace=AGENT_NAMESPACE, lifetime="detached", num_cpus=0, get_if_exists=True,
    ).remote(asdict(spec))
    names: list[str] = ray.get(supervisor.sync.remote(), timeout=120)
    return names


def stop_store() -> None:
    """Stop the supervisor first (so it starts nothing new), then every agent."""
    try:
        supervisor = ray.get_actor(SUPERVISOR_NAME, namespace=AGENT_NAMESPACE)
        ray.get(supervisor.stop.remote(), timeout=10)
        ray.kill(supervisor)
    except ValueError:
        pass
    except Exception as e:
        log.warning("store supervisor did not stop cleanly: %s", e)
    for name in list_agents():
        try:
            handle = ray.get_actor(name, namespace=AGENT_NAMESPACE)
        except ValueError:
            continue
        try:
            ray.get(handle.shutdown.remote(), timeout=10)
        except Exception as e:
            log.warning("agent %s did not shut down cleanly: %s", name, e)
        ray.kill(handle)
