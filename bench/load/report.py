"""A run's figures: latency percentiles, throughput and goodput under SLOs, as JSON and as a
markdown table. Pure arithmetic over ``bench.stats.RequestResult``s (unit-tested).

Goodput is what a user of the service gets: requests per second that met every bound of the
SLO (time to first token, time per output token, end to end), over the run's wall time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.stats import RequestResult, percentile, ratio

QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    """Bounds a request must meet to count toward goodput; None = not bounded."""

    name: str = "custom"
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def met(self, r: RequestResult) -> bool:
        if not r.ok or r.ttft_s is None:
            return False
        checks = ((self.ttft_s, r.ttft_s), (self.tpot_s, r.tpot_s), (self.e2e_s, r.e2e_s))
        return all(bound is None or (value is not None and value <= bound) for bound, value in checks)

    def scaled(self, factor: float) -> Slo:
        def s(x: float | None) -> float | None:
            return None if x is None else x * factor

        return Slo(self.name, s(self.ttft_s), s(self.tpot_s), s(self.e2e_s))


# The seed scenarios (GPU-scale bounds). ``--slo-scale`` stretches them for slower hardware:
# a 135M model on two CPU cores decodes in tens of milliseconds per token, not a few.
SCENARIOS = {
    "chat": Slo("chat", ttft_s=1.0, tpot_s=0.030),  # streaming chat: 30 ms per token
    "code": Slo("code", e2e_s=1.0),  # code completion: the whole answer in about a second
    "rewrite": Slo("rewrite", e2e_s=0.050),  # query rewrite: 50 ms end to end
}


def inter_token_gaps(r: RequestResult) -> list[float]:
    """Per output token after the first, the wait for it (a chunk of n tokens after a gap g
    counts as n tokens of g / n each: what a reader of the stream experienced per token)."""
    out: list[float] = []
    for (a, _), (b, n) in zip(r.token_events, r.token_events[1:], strict=False):
        out += [(b - a) / n] * n
    return out


def summarize_run(results: Sequence[RequestResult], wall_s: float, slos: Sequence[Slo]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    series = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [g for r in ok for g in inter_token_gaps(r)],
        "e2e": [r.e2e_s for r in ok],
        # Per request, its longest wait between two tokens: the stall a reader notices, which
        # ITL percentiles (pooled over every token) hide.
        "max_gap": [g for r in ok if (g := r.max_gap_s) is not None],
    }
    out: dict[str, Any] = {
        "requests": len(results), "failed": len(results) - len(ok), "wall_s": round(wall_s, 3),
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": sum(r.n_out for r in ok),
        "answers_without_ids": sum(1 for r in ok if r.n_out and not r.output_ids),
    }
    for name, xs in series.items():
        for q in QUANTILES:
            out[f"{name}_p{q}_s"] = percentile(xs, q)
    out["requests_per_s"] = ratio(float(len(ok)), wall_s)
    out["output_tok_per_s"] = ratio(float(out["output_tokens"]), wall_s)
    out["goodput"] = {s.name: {"slo": asdict(s), "met": sum(1 for r in results if s.met(r)),
                               "attainment": ratio(float(sum(1 for r in results if s.met(r))), float(len(results))),
                               "requests_per_s": ratio(float(sum(1 for r in results if s.met(r))), wall_s)}
                      for s in slos}
    out["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return out


def prefix_hit_rate(results: Sequence[RequestResult]) -> float | None:
    """Prompt tokens the prefill engine took from a cache (its own or the store) instead of
    computing, over the successful requests; only pdserve reports it per request (its
    ``pdserve`` response field), so None for other servers."""
    ok = [r for r in results if r.ok and r.trace]
    prompt = sum(r.prompt_tokens for r in ok)
    return sum(int(r.trace.get("prefill_cached_tokens", 0)) for r in ok) / prompt if prompt else None


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def markdown(runs: dict[str, dict[str, Any]]) -> str:
    """One row per run (system or setting): TTFT/TPOT/ITL/e2e p50 / p90 / p99 ms, throughput
    and goodput per SLO; failed requests are a column, never dropped silently."""
    slos = sorted({name for s in runs.values() for name in s.get("goodput", {})})
    head = ["run", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "ITL p50/p90/p99 ms", "e2e p50/p90/p99 ms",
            "req/s", "out tok/s", *[f"goodput {n} req/s (met)" for n in slos], "failed"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, s in runs.items():
        if "error" in s:
            lines.append(f"| {name} | error: {str(s['error'])[:80]} |" + " |" * (len(head) - 2))
            continue
        cells = [name] + ["/".join(_ms(s[f"{m}_p{q}_s"]) for q in QUANTILES) for m in ("ttft", "tpot", "itl", "e2e")]
        cells += [f"{s['requests_per_s'] or 0:.2f}", f"{s['output_tok_per_s'] or 0:.1f}"]
        for n in slos:
            g = s["goodput"].get(n)
            cells.append("-" if g is None else f"{g['requests_per_s'] or 0:.2f} ({g['attainment'] or 0:.0%})")
        cells.append(str(s["failed"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
