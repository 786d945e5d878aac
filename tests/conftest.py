"""Shared fixtures: a private Redis per test session, a leak check for store segments, and a
directory of the session's for the ZMQ sockets of the vLLM engines the tests start themselves."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.runtime import start_redis, stop_pid
from kvstore.janitor import ENGINE_LEFTOVERS, ENGINE_LOCKS, RPC_ENV, orphaned_segments
from kvstore.segment import SHM_DIR


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url, _port, pid = start_redis(Path(tmp_path_factory.mktemp("redis")))
    yield url
    stop_pid(pid)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def _segments() -> set[str]:
    # pdkv-*: the store's segments; psm_* and sem.mp-*: vLLM's engine message queues and its
    # spawned processes' locks (left behind when an engine is killed instead of shut down).
    return {n for n in os.listdir(SHM_DIR) if n.startswith(("pdkv-", *ENGINE_LEFTOVERS))}


@pytest.fixture(autouse=True, scope="session")
def no_leaked_segments() -> Iterator[None]:
    before = _segments()
    yield
    # an engine lock counts once no live process maps it (this one may hold some of its own)
    orphans = {p.name for p in orphaned_segments(prefixes=(ENGINE_LOCKS,), min_age_s=0.0)}
    leaked = sorted(n for n in _segments() - before if not n.startswith(ENGINE_LOCKS) or n in orphans)
    assert not leaked, f"shared memory left in {SHM_DIR}: {leaked}"


@pytest.fixture(autouse=True, scope="session")
def engine_sockets_of_the_session() -> Iterator[Path]:
    """The vLLM engines the tests start themselves (the monolithic references, the TP and
    KV-event checks, the benchmarks' servers) bind their ZMQ ipc sockets here, not at /tmp's
    top level: vLLM leaves those files behind even after a clean shutdown. Removed at the
    session's end. pdserve's own engines choose their own place (``running_pdserve`` does not
    pass this on), which the e2e fixture checks."""
    d = Path(tempfile.mkdtemp(prefix="pdtest-rpc-"))  # short: a socket's path has 107 bytes at most
    before = os.environ.get(RPC_ENV)
    os.environ[RPC_ENV] = str(d)
    yield d
    if before is None:
        os.environ.pop(RPC_ENV, None)
    else:
        os.environ[RPC_ENV] = before
    shutil.rmtree(d, ignore_errors=True)
