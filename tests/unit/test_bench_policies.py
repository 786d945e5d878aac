"""bench.policies' interleaved rounds: kv_aware's TTFT ratio to each other policy per round,
and the table that reports it."""

from __future__ import annotations

from bench.policies import round_ratios, table


def _run(p50: float, p90: float) -> dict[str, float]:
    return {"ttft_p50_s": p50, "ttft_p90_s": p90}


def test_round_ratios_are_kv_aware_over_each_policy_per_round_with_their_median() -> None:
    rounds = [
        {"kv_aware": _run(0.6, 1.0), "round_robin": _run(0.5, 1.0), "prefix_tree_approx": _run(0.8, 2.0)},
        {"round_robin": _run(0.8, 1.0), "prefix_tree_approx": {"error": "x"}, "kv_aware": _run(0.6, 0.9)},
        {"prefix_tree_approx": _run(0.6, 1.2), "kv_aware": _run(0.6, 1.2), "round_robin": _run(0.6, 1.5)},
    ]
    got = round_ratios(rounds)
    assert got["round_robin"]["p50"] == [1.2, 0.75, 1.0] and got["round_robin"]["p50_median"] == 1.0
    assert got["round_robin"]["p90"] == [1.0, 0.9, 0.8] and got["round_robin"]["p90_median"] == 0.9
    # the round where prefix_tree_approx failed is left out, not counted as a win or a loss
    assert got["prefix_tree_approx"]["p50"] == [0.75, 1.0]
    report = {"policies": {"kv_aware": {**_run(0.6, 1.0), "prefix_hit_rate": 0.8, "prefill_split": [2, 2],
                                        "failed": 0}},
              "rounds": rounds, "round_ratios": got}
    text = table(report)
    assert "| round_robin | 1.00x (1.20, 0.75, 1.00) | 0.90x (1.00, 0.90, 0.80) |" in text
