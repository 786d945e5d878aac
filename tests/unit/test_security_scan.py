"""Static and supply-chain scans, gating: `bandit` over every serving module (no high finding;
each medium one explained below, so a new one fails here until someone reads it) and
`pip-audit` over the installed environment (no known vulnerability unless explained)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLANES = ["cluster", "router", "prefill_worker", "decode_worker", "kvstore"]

# (file, bandit test id) -> why the finding is intended. Medium severity only: high is never allowed.
EXPLAINED_MEDIUM = {
    ("cluster/cli.py", "B310"): "urlopen of the router's own http:// URL from the run state (status, up's wait)",
    ("cluster/cli.py", "B104"): "compares the configured host to 0.0.0.0 to require API keys beyond loopback",
    ("cluster/model.py", "B615"): "from_pretrained on a local directory (the model wheel's files); never the hub",
    ("cluster/runtime.py", "B108"): "Ray's temp dir under /tmp, made private per run (mkdtemp)",
    ("kvstore/janitor.py", "B108"): "/dev/shm is where the engines' shared memory lives: the janitor's subject",
    ("kvstore/segment.py", "B108"): "/dev/shm is where the store's segments live (shared memory, mode 600)",
}
EXPLAINED_VULNS: dict[str, str] = {}  # advisory id -> why it does not apply (none today)


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is not installed: it is in the test extras (bash deploy/test.sh installs them)")
    return path


def test_bandit_finds_nothing_high_and_nothing_unexplained() -> None:
    done = subprocess.run([_tool("bandit"), "-q", "-r", *PLANES, "-f", "json"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    results = json.loads(done.stdout)["results"]
    assert len(json.loads(done.stdout)["metrics"]) > len(PLANES), "bandit scanned nothing"
    high = [r for r in results if r["issue_severity"] == "HIGH"]
    assert not high, [(r["filename"], r["line_number"], r["issue_text"]) for r in high]
    unexplained = [(r["filename"], r["line_number"], r["test_id"], r["issue_text"]) for r in results
                   if r["issue_severity"] == "MEDIUM" and (r["filename"], r["test_id"]) not in EXPLAINED_MEDIUM]
    assert not unexplained, f"new medium findings: fix them or explain them in EXPLAINED_MEDIUM: {unexplained}"


def test_pip_audit_finds_no_known_vulnerability() -> None:
    done = subprocess.run([_tool("pip-audit"), "-l", "--progress-spinner", "off", "-f", "json"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if done.returncode not in (0, 1):
        if any(w in done.stderr for w in ("ConnectionError", "Max retries", "Temporary failure", "timed out")):
            pytest.skip(f"the vulnerability service is unreachable from here: {done.stderr.strip()[-300:]}")
        pytest.fail(f"pip-audit failed: {done.stderr[-2000:]}")
    deps = json.loads(done.stdout)["dependencies"]
    assert len(deps) > 50, "pip-audit saw almost nothing installed"
    found = [(d["name"], d["version"], v["id"], v.get("fix_versions")) for d in deps for v in d.get("vulns", [])
             if v["id"] not in EXPLAINED_VULNS]
    assert not found, f"known vulnerabilities: upgrade, or explain them in EXPLAINED_VULNS: {found}"
