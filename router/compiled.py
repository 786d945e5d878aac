"""The router's decision path, compiled: the modules every routed request runs, built into C
extensions by mypyc from their own source (no second implementation to keep in step).

    python deploy/compile_router.py            build them where they are stale (deploy/ensure.sh)
    python deploy/compile_router.py --status   which run compiled here

Why: a ``kv_aware`` decision at 64 replicas is ~1,000 lines of Python run per request (the
prefix walk, sampling, scoring, the decision record). Interpreted, its p50 / p99 were 31-39 /
65-133 µs (bench.router, the p99 target is 100 µs); compiled, 16-17 / 25-28 µs in the same
runs of the same code. mypyc keeps the semantics (the unit tests run against the compiled
modules) and adds one: a value of the wrong type at a compiled function's boundary raises
TypeError instead of passing through.

Each build records the sha256 of each module's source next to the extensions
(``router/compiled.json``). At import (``router/__init__.py``), if any module's source no
longer matches its record, all of them run from source (compiled modules check each other's
classes, so they go together), and an edit is never shadowed by an older build;
``PDSERVE_PURE_PYTHON=1`` runs them all from source. The extensions are built in place
(``<module>.cpython-*.so`` beside each source, git-ignored) and only load on the Python they
were built for, so a checkout copied to a machine with another Python runs from source too.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
MODULES = (
    "router.index.owners",
    "router.policy.inflight",
    "router.policy.kv_aware",
    "router.policy.sampling",
    "router.policy.simple",
    "router.policy.state",
)
STAMP_ENV = "PDSERVE_COMPILED_STAMP"  # another record to check against (tests)
PURE_ENV = "PDSERVE_PURE_PYTHON"

log = logging.getLogger(__name__)


def source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def digest(module: str) -> str:
    return hashlib.sha256(source(module).read_bytes()).hexdigest()


def stamp_path() -> Path:
    return Path(os.environ.get(STAMP_ENV) or ROOT / "router" / "compiled.json")


def recorded() -> dict[str, str]:
    """The source digests of the last build (empty: never built here)."""
    try:
        data = json.loads(stamp_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stale(record: dict[str, str]) -> list[str]:
    """The modules whose source differs from what ``record`` says was compiled."""
    return [m for m in MODULES if record.get(m) != digest(m)]


class _FromSource(importlib.abc.MetaPathFinder):
    """Finds the named modules at their ``.py`` (an extension beside it would win otherwise)."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(self, fullname: str, path: object = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        return importlib.util.spec_from_file_location(fullname, source(fullname))


def guard() -> None:
    """Make sure no build older than its source is imported (called once, by ``router``)."""
    if any(isinstance(f, _FromSource) for f in sys.meta_path):
        return
    if os.environ.get(PURE_ENV) == "1":
        sys.meta_path.insert(0, _FromSource(MODULES))
        return
    record = recorded()
    old = stale(record)  # every module, where nothing was recorded (never built, or a build failed)
    if old:
        if record:
            log.warning("router modules changed since they were compiled: %s; the decision path runs "
                        "from source (deploy/ensure.sh rebuilds it)", ", ".join(old))
        # All of them, not only the changed ones: a compiled module checks the classes it is
        # given against the compiled classes of the others (a compiled kv_aware refuses an
        # interpreted RoutingState: "RoutingState object expected; got RoutingState").
        sys.meta_path.insert(0, _FromSource(MODULES))


def running_compiled() -> dict[str, bool]:
    """Whether each module runs compiled in this process (imports them)."""
    return {m: not (importlib.import_module(m).__file__ or "").endswith(".py") for m in MODULES}
