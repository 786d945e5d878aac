"""bench/stats.py: the arithmetic every benchmark figure rests on (pure, no network)."""

from __future__ import annotations

import pytest

from bench.stats import RequestResult, percentile, ratio, ratios, summarize, tpot


def test_percentile_linear_interpolation_matches_numpy_default() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    # rank (4-1)*0.9 = 2.7 -> 3 + 0.7 * (4 - 3)
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile([7.0], 90) == 7.0


def test_percentile_empty_and_bad_q() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_tpot_excludes_first_token_and_counts_tokens_not_chunks() -> None:
    # first token at 0.5 s, then a chunk of 3 tokens at 0.8 s and 1 token at 1.0 s: 5 tokens,
    # 4 after the first, over 0.5 s.
    assert tpot([(0.5, 1), (0.8, 3), (1.0, 1)]) == pytest.approx(0.5 / 4)
    assert tpot([(0.5, 1)]) is None  # one token: no TPOT
    assert tpot([]) is None


def test_ratio_guards() -> None:
    assert ratio(3.0, 2.0) == pytest.approx(1.5)
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 2.0) is None
    assert ratios({"a": 2.0, "b": None}, {"a": 4.0, "b": 1.0}, keys=("a", "b", "c")) == {
        "a": pytest.approx(0.5), "b": None, "c": None}


def test_request_result_properties() -> None:
    r = RequestResult(prompt_tokens=10, token_events=[(0.2, 1), (0.3, 1), (0.9, 2)], e2e_s=1.0)
    assert r.n_out == 4
    assert r.ttft_s == 0.2
    assert r.tpot_s == pytest.approx(0.7 / 3)
    assert r.max_gap_s == pytest.approx(0.6)


def test_summarize_skips_failures_and_computes_throughput() -> None:
    good = [RequestResult(prompt_tokens=8, token_events=[(t, 1), (t + 1.0, 1)], e2e_s=t + 1.0)
            for t in (1.0, 2.0, 3.0)]
    bad = RequestResult(prompt_tokens=8, ok=False, error="boom", e2e_s=0.1)
    s = summarize([*good, bad], wall_s=3.0)
    assert s["requests"] == 4 and s["failed"] == 1
    assert s["output_tokens"] == 6
    assert s["output_tok_per_s"] == pytest.approx(2.0)
    assert s["ttft_p50_s"] == pytest.approx(2.0)
    assert s["ttft_p90_s"] == pytest.approx(2.8)
    assert s["tpot_p50_s"] == pytest.approx(1.0)
    assert s["e2e_p90_s"] == pytest.approx(3.8)
