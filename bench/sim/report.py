"""What a sweep leaves behind: a markdown table per cluster size (with kv_aware's ratio to
every other policy), the JSON of every run, and PNG plots when matplotlib is importable."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.sim.runner import SizeResult, SweepConfig

REFERENCE = "kv_aware"


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def table(res: SizeResult, cfg: SweepConfig) -> str:
    main = res.main
    ref = main.get(REFERENCE)
    ref_knee = res.knees.get(REFERENCE)
    first = next(iter(main.values()), None)
    offered = f"{first.offered_rps:.1f}" if first else "-"
    lines = [
        f"#### {res.replicas} replicas ({res.n_prefill} prefill + {res.n_decode} decode, {cfg.per_node} per node), "
        f"{cfg.cost.name}: main load {cfg.main_load:g} x capacity estimate = {offered} req/s offered; "
        f"SLO TTFT <= {cfg.slo.ttft_s:g} s and TPOT <= {cfg.slo.tpot_s * 1e3:g} ms",
        "",
        "| policy | TTFT p50 | p90 | p99 (ms) | TPOT p50 | p90 (ms) | own | store node | store remote | computed "
        "| SLO met | goodput (req/s) | rate at 90% SLO (req/s) | kv_aware goodput / this | kv_aware rate@90% / this |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for policy, s in main.items():
        k = res.knees.get(policy)
        knee_txt = "-" if k is None else (f"{k.rps:.1f}" if k.note == "interpolated" else
                                           f"{'>' if k.note.startswith('above') else '<'}{k.rps:.1f}")
        g_ratio = _ratio(ref.goodput_rps, s.goodput_rps) if ref else "-"
        both = ref_knee is not None and k is not None and ref_knee.note == k.note == "interpolated"
        k_ratio = _ratio(ref_knee.rps, k.rps) if both and ref_knee and k else "-"
        lines.append(
            f"| {policy} | {_ms(s.ttft_p50_s)} | {_ms(s.ttft_p90_s)} | {_ms(s.ttft_p99_s)} | {_ms(s.tpot_p50_s)} "
            f"| {_ms(s.tpot_p90_s)} | {s.hit_own:.0%} | {s.hit_store_node:.0%} | {s.hit_store_remote:.0%} "
            f"| {s.computed:.0%} | {s.slo_attainment:.1%} | {s.goodput_rps:.1f} | {knee_txt} | {g_ratio} | {k_ratio} |")
    return "\n".join(lines)


def sweep_table(res: SizeResult, cfg: SweepConfig) -> str:
    """SLO attainment of every policy at every rate of the sweep ("-": not run, it had already
    dropped below the target at a lower rate)."""
    rates: dict[float, float] = {}  # load -> offered req/s (the same stream for every policy)
    for runs in res.sweep.values():
        for load, s in runs.items():
            rates.setdefault(load, s.offered_rps)
    loads = sorted(rates)
    head = "| SLO attainment | " + " | ".join(f"{rates[x]:.0f} req/s ({x:g}x)" for x in loads) + " |"
    lines = [head, "|---|" + "---:|" * len(loads)]
    for policy in cfg.policies:
        runs = res.sweep.get(policy, {})
        cells = [f"{runs[x].slo_attainment:.1%}" if x in runs else "-" for x in loads]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(results: Sequence[SizeResult], cfg: SweepConfig, meta: dict[str, Any]) -> dict[str, Any]:
    cfg_dict = asdict(cfg)
    cfg_dict["cost"] = asdict(cfg.cost)
    cfg_dict["stream"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg.stream).items()}
    return {
        "meta": meta,
        "config": cfg_dict,
        "sizes": [{
            "replicas": r.replicas, "n_prefill": r.n_prefill, "n_decode": r.n_decode,
            "capacity": {"rps": r.capacity.rps, **asdict(r.capacity)}, "wall_s": r.wall_s,
            "main": {p: s.to_dict() for p, s in r.main.items()},
            "sweep": {p: [{"load": load, **s.to_dict()} for load, s in sorted(runs.items())]
                      for p, runs in r.sweep.items()},
            "knee_90": {p: asdict(k) for p, k in r.knees.items()},
            "ttft_cdf": {p: [[round(t, 6), round(f, 4)] for t, f in pts] for p, pts in r.cdf.items()},
        } for r in results],
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN (an empty percentile) is not JSON: write null
    path.write_text(json.dumps(_clean(doc), indent=1) + "\n")


def _clean(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def plots(doc: dict[str, Any], stem: Path) -> list[Path]:
    """From a run's JSON (``to_json``): goodput vs offered rate, and the TTFT CDF at the main
    load, one panel per size. Returns the files written; raises ImportError when matplotlib
    is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, sizes = doc["config"], doc["sizes"]
    written = []
    for kind in ("goodput", "ttft_cdf"):
        fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
        for ax, size in zip(axes[0], sizes, strict=True):
            for policy in cfg["policies"]:
                if kind == "goodput":
                    pts = sorted(size["sweep"].get(policy, []), key=lambda s: s["offered_rps"])
                    ax.plot([s["offered_rps"] for s in pts], [s["goodput_rps"] for s in pts], marker="o", label=policy)
                else:
                    cdf = size["ttft_cdf"].get(policy, [])
                    ax.plot([t for t, _ in cdf], [f for _, f in cdf], label=policy)
            if kind == "goodput":
                hi = max((s["offered_rps"] for pts in size["sweep"].values() for s in pts), default=1.0)
                ax.plot([0, hi], [0, hi], color="grey", linestyle=":", linewidth=1, label="offered")
                ax.set_xlabel("offered rate (req/s)")
                ax.set_ylabel("goodput (req/s meeting TTFT and TPOT SLOs)")
            else:
                ax.axvline(cfg["slo"]["ttft_s"], color="grey", linestyle=":", linewidth=1)
                ax.set_xscale("log")
                ax.set_xlabel("TTFT (s), main load")
                ax.set_ylabel("fraction of requests")
            ax.set_title(f"{size['replicas']} replicas, {cfg['cost']['name']}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.sim.report RESULT.json``: the plots again, from a saved run."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.sim.report RESULT.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        written = plots(json.loads(path.read_text()), path.with_suffix(""))
    except ImportError:
        print("matplotlib is not importable: no plots", file=sys.stderr)
        return 1
    for out in written:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
