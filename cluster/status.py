"""``pdserve status`` as text: the dashboard's picture (``GET /dashboard/data``, see
router/live.py) as plain tables, for a terminal or a log."""

from __future__ import annotations

from typing import Any


def _num(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def render(data: dict[str, Any], deployments: dict[str, Any] | None = None) -> str:
    """The snapshot as text; ``deployments``: Serve's view (status, replica states) per pool."""
    out: list[str] = []
    r = data["requests"]
    out.append(f"requests (last {r['window_s']:.0f} s): {r['requests']}  ·  {_num(r['requests_per_s'], 2)} req/s  ·  "
               f"{_num(r['output_tokens_per_s'], 1)} output tok/s  ·  prefix hit rate {_pct(r['prefix_hit_rate'])}")
    out.append("TTFT p50/p90/p99: " + " / ".join(_ms(r["ttft_s"][p]) for p in ("p50", "p90", "p99")) +
               "   TPOT p50/p90/p99: " + " / ".join(_ms(r["tpot_s"][p]) for p in ("p50", "p90", "p99")))
    for role, rows in data["pools"].items():
        serve = (deployments or {}).get(role)
        states = f"  (Serve: {serve['status']}, {serve['replicas']})" if serve else ""
        out += ["", f"{role}: {len(rows)} replicas{states}"]
        out += _table(["replica", "node", "util", "running", "waiting", "kv", "prefill tok/s", "out tok/s", "hits"],
                      [[x["replica"], x["node"][:12], _pct(x["utilization"]), str(x["running"]), str(x["waiting"]),
                        _pct(x["kv_usage"]), _num(x["prefill_tokens_per_s"]), _num(x["output_tokens_per_s"], 1),
                        _pct(x["prefix_hit_rate"])] for x in rows])
    if not data["pools"]:
        out += ["", "pools: no request routed yet"]
    s = data["store"]
    out.append("")
    if not s.get("available"):
        out.append("store: metrics unavailable")
        return "\n".join(out)
    out.append(f"store: lookup hit rate {_pct(s['lookup_hit_rate'])}  ·  " + "  ·  ".join(
        f"{k.replace('_', ' ')} {'-' if v is None else f'{v / 1e6:.1f} MB/s'}" for k, v in s["bytes_per_s"].items()))
    out += _table(["node", "fill", "chunks", "evicted", "reachable"],
                  [[node[:12], _pct(n["fill"]), str(n["chunks"]), str(n["evicted"]), "yes" if n["reachable"] else "NO"]
                   for node, n in s["nodes"].items()])
    return "\n".join(out)
