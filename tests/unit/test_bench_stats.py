"""bench/stats.py: the arithmetic every benchmark figure rests on (pure, no network)."""

from __future__ import annotations

import pytest

from bench.stats import RequestResult, percentile, ratio, tpot


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


def test_request_result_properties() -> None:
    r = RequestResult(prompt_tokens=10, token_events=[(0.2, 1), (0.3, 1), (0.9, 2)], e2e_s=1.0)
    assert r.n_out == 4
    assert r.ttft_s == 0.2
    assert r.tpot_s == pytest.approx(0.7 / 3)
    assert r.max_gap_s == pytest.approx(0.6)
