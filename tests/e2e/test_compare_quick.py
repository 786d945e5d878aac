"""`python -m bench.compare --quick`: the side-by-side comparison, CI-sized, on real engines.
Its output must be complete: every system has figures for every workload, nothing failed,
the ratios and plots are there. (The full run is the same code with more requests.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.compare.plan import WORKLOADS


def test_quick_comparison_writes_complete_tables_and_plots(model_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--quick", "--systems", "pdserve,monolithic",
         "--out-dir", str(tmp_path), "--name", "quick"],
        capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((tmp_path / "quick.json").read_text())
    assert set(report["systems"]) == {"pdserve", "monolithic"}
    for name, system in report["systems"].items():
        assert "error" not in system, (name, system["error"])
        assert set(system["workloads"]) == set(WORKLOADS)
        for workload, done_ in system["workloads"].items():
            s = done_["summary"]
            assert s["failed"] == 0 and s["requests"] == len(done_["records"]) > 0, (name, workload, s["errors"])
            assert s["checks"] == [], (name, workload, s["checks"])  # every answer as long as asked
            for key in ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "e2e_p50_s", "output_tok_per_s"):
                assert isinstance(s[key], float) and s[key] > 0, (name, workload, key, s[key])
            assert 0.0 <= s["goodput"]["chat"]["attainment"] <= 1.0
    multiturn = report["systems"]["pdserve"]["workloads"]["multiturn"]["summary"]
    assert multiturn["prefix_hit_rate"] > 0.3  # later turns resend the history: most of it was cached
    text = (tmp_path / "quick.md").read_text()
    for workload in WORKLOADS:
        assert f"## {workload}" in text
        assert f"| {workload} | " in text.split("## Headline", 1)[1]  # a headline row of ratios
    assert "pdserve / monolithic" in text and "no figures" not in text
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert len(report["plots"]) == 2
    assert {p.name for p in (tmp_path / "quick.logs").iterdir()} >= {"pdserve.log", "monolithic.log"}
