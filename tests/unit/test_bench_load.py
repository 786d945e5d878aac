"""bench/load: the workloads ``pdserve bench`` builds and the figures it reports (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.load.report import SCENARIOS, Slo, inter_token_gaps, markdown, summarize_run
from bench.load.workloads import (
    Shape,
    TraceScale,
    multiturn_workload,
    poisson_arrivals,
    random_workload,
    shared_prefix_workload,
    trace_workload,
)
from bench.stats import RequestResult

VOCAB = list(range(1000, 1400))


def test_trace_lines_that_share_hash_ids_share_that_prompt_prefix(tmp_path: Path) -> None:
    lines = [  # Mooncake's format: ms timestamps, lengths in tokens, 512-token blocks per hash id
        {"timestamp": 1000, "input_length": 1024, "output_length": 512, "hash_ids": [7, 8]},
        {"timestamp": 3000, "input_length": 1300, "output_length": 40, "hash_ids": [7, 8, 9]},
        {"timestamp": 3500, "input_length": 512, "output_length": 10, "hash_ids": [5]},
    ]
    f = tmp_path / "trace.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    a, b, c = trace_workload(VOCAB, f, TraceScale(tokens_per_id=16, max_output=8, time_scale=0.5), seed=1)
    pa, pb, pc = (s.turns[0].new_tokens for s in (a, b, c))
    assert len(pa) == 32 and len(pb) == round(1300 * 16 / 512) and len(pc) == 16  # lengths scale with the id
    assert pb[:32] == pa and pc != pa[:16]  # ids 7, 8 are one shared prefix; id 5 is another block
    assert [s.turns[0].max_tokens for s in (a, b, c)] == [8, 1, 1]  # scaled, capped, at least one
    assert [s.arrival_s for s in (a, b, c)] == pytest.approx([0.0, 1.0, 1.25])  # (ms - first) / 1000 * 0.5
    assert trace_workload(VOCAB, f, TraceScale(limit=2), seed=1)[-1].tag == "line2"


def test_a_malformed_trace_line_is_named(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        trace_workload(VOCAB, f, TraceScale(), seed=0)


def test_synthetic_workloads_share_what_they_should() -> None:
    shape = Shape(requests=6, input_len=40, output_len=5, system_prompts=2, system_len=100, turns=3)
    rnd = random_workload(VOCAB, shape, seed=3)
    assert all(30 <= len(s.turns[0].new_tokens) <= 50 for s in rnd)
    assert len({tuple(s.turns[0].new_tokens[:10]) for s in rnd}) == 6  # no shared prefix
    sp = shared_prefix_workload(VOCAB, shape, seed=3)
    assert sp[0].turns[0].new_tokens[:100] == sp[2].turns[0].new_tokens[:100] != sp[1].turns[0].new_tokens[:100]
    mt = multiturn_workload(VOCAB, shape, seed=3)
    assert [len(s.turns) for s in mt] == [3] * 6 and mt[0].group == 0 and mt[1].group == 1
    assert mt[0].turns[0].new_tokens[:100] == sp[0].turns[0].new_tokens[:100]  # same seed, same system prompts
    assert random_workload(VOCAB, shape, seed=3)[0].turns == rnd[0].turns  # seeded


def test_poisson_arrivals_rise_at_the_asked_rate() -> None:
    sessions = poisson_arrivals(random_workload(VOCAB, Shape(requests=2000, input_len=4), seed=0), rate=4.0, seed=0)
    times = [s.arrival_s for s in sessions]
    assert times == sorted(times) and times[0] == 0.0
    assert times[-1] / (len(times) - 1) == pytest.approx(0.25, rel=0.1)
    with pytest.raises(ValueError):
        poisson_arrivals(sessions, rate=0, seed=0)


def _result(ttft: float, gaps: list[tuple[float, int]], e2e: float, ok: bool = True) -> RequestResult:
    r = RequestResult(prompt_tokens=10, ok=ok, e2e_s=e2e)
    r.token_events = [(ttft, 1), *gaps]
    return r


def test_goodput_counts_requests_within_every_bound_of_the_slo() -> None:
    fast = _result(0.2, [(0.3, 1), (0.4, 1)], 0.45)  # TPOT 0.1
    slow_tokens = _result(0.2, [(1.2, 2)], 1.3)  # one chunk of 2 after 1 s: TPOT 0.5
    late = _result(3.0, [(3.1, 1)], 3.2)
    failed = _result(0.1, [], 0.1, ok=False)
    chat = Slo("chat", ttft_s=1.0, tpot_s=0.2)
    assert [chat.met(r) for r in (fast, slow_tokens, late, failed)] == [True, False, False, False]
    assert inter_token_gaps(slow_tokens) == pytest.approx([0.5, 0.5])  # a 2-token chunk: 2 tokens of 0.5 s
    s = summarize_run([fast, slow_tokens, late, failed], wall_s=2.0, slos=[chat, Slo("loose", e2e_s=5.0)])
    assert s["failed"] == 1 and s["requests_per_s"] == pytest.approx(1.5)
    assert s["goodput"]["chat"]["met"] == 1 and s["goodput"]["chat"]["requests_per_s"] == pytest.approx(0.5)
    assert s["goodput"]["loose"]["attainment"] == pytest.approx(0.75)
    assert s["ttft_p50_s"] == pytest.approx(0.2) and s["itl_p99_s"] is not None
    table = markdown({"rate 1/s": s, "broken": {"error": "refused"}})
    assert "| rate 1/s | 200/" in table and "0.50 (25%)" in table and "| broken | error: refused" in table


def test_slo_scenarios_scale_for_slower_hardware() -> None:
    chat = SCENARIOS["chat"].scaled(10)
    assert chat.tpot_s == pytest.approx(0.3) and chat.ttft_s == pytest.approx(10.0) and chat.e2e_s is None
