"""The store's Redis when pdserve joins a Ray cluster it did not start (``ray_address``).

Such a cluster can end without `pdserve down`: `ray stop` and `ray down` stop Ray's own
processes and know nothing of a Redis daemon. So Redis runs as the child of a detached,
CPU-less actor on the node where `pdserve up` runs, and the kernel ends it when that actor's
process ends, however it ends (`ray stop` SIGTERMs every ``ray::`` process; `pdserve down`
kills the actor).

    pdserve up ──> RedisHost actor (this node) ──child, PR_SET_PDEATHSIG──> redis-server
    ray stop / ray down / pdserve down ──> the actor's process ends ──> kernel SIGTERMs Redis
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.runtime import start_redis_child

NAMESPACE = "pdserve"
NAME = "pdserve-redis"


class RedisHost:
    def __init__(self, run_dir: str) -> None:
        started: queue.Queue[tuple[str, int, int] | BaseException] = queue.Queue()
        threading.Thread(target=self._keep, args=(Path(run_dir), started), name="pdserve-redis", daemon=True).start()
        got = started.get(timeout=30)
        if isinstance(got, BaseException):
            raise got
        self._address = got

    @staticmethod
    def _keep(run_dir: Path, started: queue.Queue[tuple[str, int, int] | BaseException]) -> None:
        # The death signal follows the *thread* that started Redis, not the process: this
        # thread starts it and then lives exactly as long as Redis does, reaping it.
        try:
            # Bound to this node's address too: engines and agents on other hosts reach it
            # there, with the password its URL carries.
            proc, url, port = start_redis_child(run_dir, ray.util.get_node_ip_address())
        except BaseException as e:
            started.put(e)
            return
        started.put((url, port, proc.pid))
        proc.wait()

    def address(self) -> tuple[str, int, int]:
        """(url, port, pid) of the Redis this actor hosts."""
        return self._address


def start_redis_host(run_dir: Path) -> tuple[str, int, int]:
    """Start the Redis host on this node (the driver's); returns Redis' (url, port, pid)."""
    host = ray.remote(RedisHost).options(
        name=NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(str(run_dir))
    url, port, pid = ray.get(host.address.remote(), timeout=60)
    return str(url), int(port), int(pid)


def stop_redis_host() -> None:
    """Kill the Redis host if there is one; its Redis ends with it."""
    try:
        ray.kill(ray.get_actor(NAME, namespace=NAMESPACE))
    except ValueError:  # none: this cluster's Redis was not ours to host
        pass
