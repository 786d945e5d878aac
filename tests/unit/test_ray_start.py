"""cluster.runtime.start_ray_head: a `ray start` that timed out waiting for its own GCS (a
loaded machine) is stopped and started once more; any other failure is reported at once.
`ray start` itself is stood in for (tests/e2e start real clusters)."""

import subprocess
from typing import Any

import pytest

from cluster import runtime
from cluster.runtime import StartError, start_ray_head

TIMED_OUT = ("INFO node.py:438 -- Failed to get node info b'RPC error: Deadline Exceeded'\n"
             "Exception: The current node timed out during startup. This could happen because some of the raylet "
             "failed to startup or the GCS has become overloaded.")


@pytest.fixture
def ray(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    seen: dict[str, list[Any]] = {"runs": [], "stopped": [], "answers": []}

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen["runs"].append(cmd)
        code, err = seen["answers"].pop(0)
        return subprocess.CompletedProcess(cmd, code, "", err)

    monkeypatch.setattr(runtime.subprocess, "run", run)
    monkeypatch.setattr(runtime, "stop_ray", lambda temp_dir: seen["stopped"].append(temp_dir))
    return seen


def temp_dir(cmd: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in cmd if a.startswith("--temp-dir="))


def test_a_start_that_timed_out_on_its_gcs_is_stopped_and_started_again(ray: dict[str, list[Any]]) -> None:
    ray["answers"] = [(1, TIMED_OUT), (0, "")]
    address, tmp = start_ray_head(num_cpus=2)
    first, second = ray["runs"]
    assert ray["stopped"] == [temp_dir(first)] and tmp == temp_dir(second) != temp_dir(first)
    assert address.endswith(next(a.split("=")[1] for a in second if a.startswith("--port=")))
    assert "--num-cpus=2" in second


def test_any_other_failure_is_reported_at_once(ray: dict[str, list[Any]]) -> None:
    ray["answers"] = [(1, "ValueError: --port=abc is not a valid port")]
    with pytest.raises(StartError, match="not a valid port"):
        start_ray_head()
    assert len(ray["runs"]) == 1 and len(ray["stopped"]) == 1


def test_a_second_timeout_is_reported_with_what_ray_said(ray: dict[str, list[Any]]) -> None:
    ray["answers"] = [(1, TIMED_OUT), (1, TIMED_OUT)]
    with pytest.raises(StartError, match="timed out during startup"):
        start_ray_head()
    assert len(ray["runs"]) == 2 and len(set(ray["stopped"])) == 2
