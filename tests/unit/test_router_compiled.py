"""The router's decision path runs compiled (``router.compiled``), never from a build older
than its source, and the same modules pass their tests run from source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from router.compiled import MODULES, PURE_ENV, STAMP_ENV, digest

REPO = Path(__file__).resolve().parents[2]
STATUS = [sys.executable, str(REPO / "deploy/compile_router.py"), "--status"]


def _status(**env: str) -> dict[str, str]:
    out = subprocess.run(STATUS, capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, **env}).stdout
    return dict(line.split(": ") for line in out.splitlines())


def test_the_test_command_built_the_decision_path_and_it_runs_compiled() -> None:
    # deploy/test.sh (ensure.sh) compiles it: the router's benchmarks and the tests run that build
    assert _status() == {m: "compiled" for m in MODULES}


def test_a_module_edited_since_the_build_sends_the_whole_path_back_to_source(tmp_path: Path) -> None:
    record = {m: digest(m) for m in MODULES}
    record["router.policy.state"] = "0" * 64  # as if state.py changed after the build
    stamp = tmp_path / "compiled.json"
    stamp.write_text(json.dumps(record))
    # all of them: a compiled kv_aware refuses an interpreted RoutingState
    assert set(_status(**{STAMP_ENV: str(stamp)}).values()) == {"source"}
    assert set(_status().values()) == {"compiled"}  # the real record is current


def test_without_a_record_of_the_build_nothing_compiled_runs(tmp_path: Path) -> None:
    assert set(_status(**{STAMP_ENV: str(tmp_path / "none.json")}).values()) == {"source"}


def test_the_router_modules_pass_their_unit_tests_run_from_source() -> None:
    tests = ["test_policies.py", "test_owner_index_kinds.py", "test_kv_aware_sampling.py", "test_store_index.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *(str(REPO / "tests/unit" / t) for t in tests)],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, PURE_ENV: "1"})
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout.splitlines()[-1]
