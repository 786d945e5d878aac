"""The store and router microbenchmarks as a user runs them (``--quick``): every data path and
every policy is measured and reported, the figures hang together, and nothing is left running
or mapped. The figures themselves are for bench/results and the README, never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.kvstore.__main__ import ORDER
from router.policy import POLICIES

REPO = Path(__file__).resolve().parents[2]


def _run(module: str, out: Path, timeout_s: int) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_store_bench_measures_every_path_with_verified_gets_and_cleans_up(tmp_path: Path) -> None:
    before = set(os.listdir("/dev/shm"))
    proc = _run("bench.kvstore", tmp_path / "kvstore.json", 900)
    report = json.loads((tmp_path / "kvstore.json").read_text())
    assert list(report["results"]) == ["64 KiB", "1 MiB"]
    for label, result in report["results"].items():
        assert set(result["figures"]) == set(ORDER), label
        for method, fig in result["figures"].items():
            assert fig["get_gbps"] > 0 and fig["put_gbps"] > 0 and fig["get_latency_us"] > 0, (label, method)
        assert {"shm/memcpy", "tcp/raw-tcp", "shm/ray", "tcp/ray-remote"} <= set(result["get_ratios"])
        for name, median in result["get_ratios"].items():
            low, high = result["get_ratio_quartiles"][name]
            assert 0 < low <= median <= high, (label, name)
            assert len(result["times_s"][name.split("/")[0].removesuffix("_put")]["get"]) == 3  # --quick: 3 turns
    assert "| tcp/raw-tcp |" in proc.stdout and "(middle half of the turns)" in proc.stdout
    left = {name for name in set(os.listdir("/dev/shm")) - before if name.startswith("pdkv")}
    assert not left, f"the benchmark's agents left their segments: {sorted(left)}"


def test_router_bench_times_every_policy_against_the_floor(tmp_path: Path) -> None:
    proc = _run("bench.router", tmp_path / "router.json", 300)
    report = json.loads((tmp_path / "router.json").read_text())
    assert [r["replicas"] for r in report["results"]] == [8, 64]
    for r in report["results"]:
        assert set(r["policies"]) == set(POLICIES)
        assert r["store_chunks"] > 0 and r["engine_chunks"] > 0 and r["index_bytes_per_chunk"] > 0
        for name, fig in r["policies"].items():
            assert 0 < fig["p50_us"] <= fig["p99_us"], (r["replicas"], name)
            assert 0 < fig["after_p50_us"] <= fig["after_p99_us"], (r["replicas"], name)
        assert r["policies"]["round_robin"]["p50_over_round_robin"] == 1.0
    assert "| kv_aware |" in proc.stdout


def test_hot_prefix_bench_reads_replicas_on_the_reading_node_after_two_pulls(tmp_path: Path) -> None:
    before = set(os.listdir("/dev/shm"))
    out = tmp_path / "hot.json"
    proc = subprocess.run([sys.executable, "-m", "bench.kvstore.hot", "--mib", "4", "--reads", "3", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())["result"]
    assert result["sources"]["pull"] == ["bench-A"] * 3  # without replication every read crosses nodes
    assert result["sources"]["replica"] == ["bench-A", "bench-A", "bench-B"]  # hot after two pulls
    assert result["replicated_chunks"] == result["chunks"]
    assert all(len(ms) == 3 and min(ms) > 0 for ms in result["read_ms"].values())
    assert "| pull / replica |" in proc.stdout
    left = {name for name in set(os.listdir("/dev/shm")) - before if name.startswith("pdkv")}
    assert not left, f"the benchmark's agents left their segments: {sorted(left)}"
