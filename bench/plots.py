"""PNG plots of benchmark runs: latency CDFs and goodput per run. Matplotlib is imported
only here and only when a plot is asked for (headless: the Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdfs(panels: Mapping[str, Mapping[str, Sequence[float]]], path: Path, xlabel: str) -> Path:
    """One panel per key of ``panels`` (e.g. a workload), one empirical CDF per series in it
    (e.g. a system); values in seconds, drawn in milliseconds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items(), strict=False):
        for name, values in series.items():
            xs = sorted(v * 1e3 for v in values)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def grouped_bars(groups: Mapping[str, Mapping[str, float | None]], path: Path, ylabel: str, title: str) -> Path:
    """Bars per group (e.g. a workload), one bar per series (e.g. a system); a missing value
    (a system without figures) leaves its slot empty rather than drawing a zero."""
    plt = _pyplot()
    series = list(dict.fromkeys(name for g in groups.values() for name in g))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(series)) * 0.5), 4.2))
    for i, name in enumerate(series):
        xs = [g + i * width for g, values in enumerate(groups.values()) if values.get(name) is not None]
        ys = [values[name] for values in groups.values() if values.get(name) is not None]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def lines(series: Mapping[str, Sequence[tuple[float, float]]], path: Path, xlabel: str, ylabel: str,
          title: str) -> Path:
    """One line per series of (x, y) points, e.g. goodput against offered rate."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for name, points in series.items():
        pts = sorted(points)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
