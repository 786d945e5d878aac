"""One real pdserve cluster per e2e session (started with the real CLI), and the monolithic
vLLM reference outputs it is held against (computed first: both need the two cores)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.model import prepare_default_model
from cluster.runtime import RunState, pids_mentioning
from kvstore import janitor
from router.tokenizer import PromptTokenizer
from tests.e2e.prompts import EQUIVALENCE, FRESH, SHARED_PREFIX, UNDER_FIRE

MAX_TOKENS = 24
MAX_MODEL_LEN = 1024
HERE = Path(__file__).parent


@dataclass
class Cluster:
    base_url: str  # .../v1
    home: Path
    env: dict[str, str]

    def state(self) -> RunState:
        state = RunState.load(self.home)
        assert state is not None, f"no run state under {self.home}"
        return state


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return prepare_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> PromptTokenizer:
    return PromptTokenizer(model_dir)


@pytest.fixture(scope="session")
def reference(model_dir: Path, tokenizer: PromptTokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """prompt text -> {"token_ids", "top2"} from one monolithic vLLM engine, greedy."""
    texts = EQUIVALENCE + [SHARED_PREFIX] + FRESH + UNDER_FIRE
    d = tmp_path_factory.mktemp("reference")
    (d / "in.json").write_text(json.dumps({"model": str(model_dir), "max_model_len": MAX_MODEL_LEN,
                                           "max_tokens": MAX_TOKENS,
                                           "prompts": [tokenizer.encode(t) for t in texts]}))
    subprocess.run([sys.executable, "-m", "tests.e2e.reference", str(d / "in.json"), str(d / "out.json")],
                   check=True, timeout=600)
    return dict(zip(texts, json.loads((d / "out.json").read_text()), strict=True))


def _pids_working_under(path: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "cwd")).is_relative_to(path):
                    found.append(int(proc.name))
            except OSError:  # gone, or not ours to read
                continue
    return found


@contextmanager
def running_pdserve(home: Path, config: Path, sets: list[str]) -> Iterator[Cluster]:
    """`pdserve up` with the real CLI, then `pdserve down` and a leak check."""
    # without the session's socket dir (tests/conftest.py): the engines must choose their own
    env = {**{k: v for k, v in os.environ.items() if k != janitor.RPC_ENV}, "PDSERVE_HOME": str(home)}
    pdserve = [sys.executable, "-m", "cluster.cli"]
    args = [x for s in sets for x in ("--set", s)]
    up = subprocess.run([*pdserve, "up", "--config", str(config), *args],
                        env=env, capture_output=True, text=True, timeout=600)
    match = re.search(r"OpenAI base URL (\S+)", up.stdout)
    state = RunState.load(home)
    try:
        assert up.returncode == 0 and match, f"pdserve up failed:\n{up.stdout[-3000:]}\n{up.stderr[-5000:]}"
        # progress, not a minute of silence: each step, then the pools' replicas coming up
        progress = re.search(r"\[5/5\] engines: \d+ prefill \+ \d+ decode", up.stdout)
        assert progress and "prefill: " in up.stdout, up.stdout
        # the engines bind their ZMQ sockets where a killed one's can be swept, not in /tmp
        rpc = janitor.engine_rpc_dir()
        assert {str(p) for p in rpc.glob("*")} & janitor.bound_socket_paths(), f"no engine socket bound in {rpc}"
        yield Cluster(match.group(1), home, env)
    finally:
        state = RunState.load(home) or state  # a test may have changed it (restarted Redis)
        if state is not None and state.ray_temp_dir:  # keep the engines' logs for a post-mortem
            shutil.copytree(Path(state.ray_temp_dir) / "session_latest" / "logs", home / "ray-logs",
                            ignore=shutil.ignore_patterns("*.sock", "events", "export_events"),
                            dirs_exist_ok=True)
        down = subprocess.run([*pdserve, "down"], env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
        # Leak check: nothing of what `up` started survives `down` (a Redis daemon runs in
        # its run dir, so a restarted one whose pid the state lost is found by that too).
        if state is not None:
            assert not state.ray_temp_dir or not pids_mentioning(state.ray_temp_dir)
            assert not state.redis_pid or not Path(f"/proc/{state.redis_pid}").exists()
        assert not _pids_working_under(home), f"processes left running in {home}"
        assert not janitor.orphaned_sockets(janitor.engine_rpc_dir(), min_age_s=0), "engine sockets left"


@pytest.fixture(scope="module")  # down before the next module's cluster comes up: 2 cores
def cluster(reference: dict, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_pdserve(tmp_path_factory.mktemp("pdserve-home"), HERE / "cluster.yaml", [f"model={model_dir}"]) as c:
        yield c
