"""Shared fixtures: a private Redis per test session, and a leak check for store segments."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.runtime import start_redis, stop_pid
from kvstore.janitor import ENGINE_LEFTOVERS, ENGINE_LOCKS, orphaned_segments
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
