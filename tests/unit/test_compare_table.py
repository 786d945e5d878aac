"""bench.compare's table: a row per system (or why it has none) and pdserve's ratio to every
peer that produced figures."""

from __future__ import annotations

from bench.compare import PEERS, SYSTEMS, parse_args, render_table
from bench.stats import FIGURES, ratios


def summary(scale: float) -> dict:
    return {**{k: 0.1 * scale for k in FIGURES}, "output_tok_per_s": 100.0 / scale, "requests": 8, "failed": 0}


def test_every_peer_with_figures_gets_a_ratio_row_and_a_failed_one_says_why() -> None:
    entries = [{"system": "pdserve", "summary": summary(1.0)}, {"system": "monolithic", "summary": summary(2.0)},
               {"system": "rayllm", "summary": summary(4.0)},
               {"system": "rayllm_pd", "error": "SystemStartError: Ray Serve LLM (pd) exited\nno CPU left"}]
    blocks = {p: ratios(entries[0]["summary"], e["summary"]) for p, e in zip(PEERS, entries[1:], strict=True)
              if "summary" in e}
    table = render_table(entries, blocks)
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith("/") else ""): line
            for line in table.splitlines() if line.strip()}
    assert "0.50x" in rows["/ monolithic"] and "2.00x" in rows["/ monolithic"]  # latency half, tok/s double
    assert "0.25x" in rows["/ rayllm"] and "4.00x" in rows["/ rayllm"]
    assert "/ rayllm_pd" not in rows and "no figures" in rows["rayllm_pd"] and "no CPU left" in rows["rayllm_pd"]
    assert "(8 req, 0 failed)" in rows["pdserve"]


def test_the_default_run_is_every_system_and_unknown_ones_are_refused() -> None:
    assert parse_args([]).systems == list(SYSTEMS) and SYSTEMS[0] == "pdserve"
    assert parse_args(["--systems", "pdserve,rayllm_pd"]).systems == ["pdserve", "rayllm_pd"]
    try:
        parse_args(["--systems", "pdserve,sglang"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown system was accepted")
