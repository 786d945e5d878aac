"""The calibration hook: simulated TTFT per request for a small workload on the machine the
project's real CPU runs use (``cpu-smollm2``: 2 prefill + 1 decode replicas on one node), so
a real run of the same requests can be held against it (the project's target: within 25%).

A request's prompt is a concatenation of named segments; two prompts share exactly the
leading tokens their segments have in common (a segment name stands for one token stream,
so a shorter run of it is a prefix of a longer one):

    CalibrationRequest(segments=(("sys", 256), ("conv1", 80)), output_tokens=16, arrival_s=0.0)
    CalibrationRequest(segments=(("sys", 256), ("conv1", 200)), output_tokens=16, arrival_s=2.0)
        -> the second shares the first's 336 tokens (the system prompt, then conv1's first 80)

Chunk keys are built from that content, chunk by chunk, exactly as equal token prefixes
give equal ``kvstore.hashing`` keys.

Checking against real runs (``python -m bench.sim.calibrate bench/results/policies.json``):
``bench.policies`` saves, per policy, every request (send time, prompt, TTFT, and the prefill
engine's share of it) and what the router measured per replica. Two inputs come from
measurements, never from the TTFTs being predicted:

    prefill speed     each replica's prefill rate as the router measured it online (prompt
                      tokens computed per busy second), over the profile's rate. Core sharing,
                      vLLM's step overhead and the store loads and saves are all inside that
                      rate, so the checked profile prices a step by its computed tokens alone
                      (step overhead and per-token load costs set to 0: counted once, not twice)
    request overhead  the time outside the prefill engine (TTFT - prefill engine time), as a
                      median over the OTHER policies' runs (leave one out): the same machine
                      and code path, not the run being predicted

The simulator then predicts the rest: queueing, cache hits and placement, by the same policy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.sim.cluster import ClusterSpec, SimCluster
from bench.sim.profiles import CPU_SMOLLM2, CostModel
from bench.sim.workload import SimRequest, chunk_keys

Piece = tuple[str, int, int]  # (segment, first token, end token) of one chunk's content


@dataclass(frozen=True)
class CalibrationRequest:
    segments: tuple[tuple[str, int], ...]  # (segment name, tokens), in prompt order
    output_tokens: int
    arrival_s: float

    @property
    def prompt_tokens(self) -> int:
        return sum(n for _, n in self.segments)


def _chunk_contents(segments: Sequence[tuple[str, int]], chunk: int) -> list[tuple[Piece, ...]]:
    """What each full chunk of the prompt holds, as pieces of named segments."""
    out: list[tuple[Piece, ...]] = []
    current: list[Piece] = []
    room = chunk
    for name, n in segments:
        pos = 0
        while pos < n:
            take = min(room, n - pos)
            current.append((name, pos, pos + take))
            pos += take
            room -= take
            if room == 0:
                out.append(tuple(current))
                current, room = [], chunk
    return out


def to_sim_requests(requests: Sequence[CalibrationRequest], chunk_tokens: int) -> list[SimRequest]:
    ids: dict[tuple[Piece, ...], int] = {}
    out = []
    for i, r in enumerate(requests):
        contents = _chunk_contents(r.segments, chunk_tokens)
        hash_ids = [ids.setdefault(c, len(ids)) for c in contents]
        keys = chunk_keys(hash_ids, r.prompt_tokens, chunk_tokens, chunk_tokens)
        out.append(SimRequest(f"c{i}", r.arrival_s, r.prompt_tokens, r.output_tokens, keys))
    return out


def simulated_ttft(requests: Sequence[CalibrationRequest], policy: str = "kv_aware", cost: CostModel = CPU_SMOLLM2,
                   prefill: int = 2, decode: int = 1, seed: int = 0, prefill_speeds: tuple[float, ...] = (),
                   shared_cores: tuple[tuple[int, int], ...] = ()) -> list[float]:
    """Simulated time to first token of each request, in the order given (seconds)."""
    spec = ClusterSpec(prefill + decode, prefill, decode, per_node=prefill + decode, prefill_speeds=prefill_speeds,
                       shared_cores=shared_cores)
    sim = to_sim_requests(requests, cost.chunk_tokens)
    records = SimCluster(spec, cost, policy, seed).run(sim)
    by_id = {r.rid: r.ttft_s for r in records}
    return [by_id[r.rid] for r in sim]



# -- against real runs (bench.policies' report) ---------------------------------------------


def outside_engine_s(records: Sequence[dict[str, Any]]) -> float:
    """Median time a request spent outside the prefill engine before its first token."""
    gaps = [r["ttft_s"] - r["prefill_engine_s"] for r in records if r.get("prefill_engine_s") is not None]
    if not gaps:
        raise ValueError("the run's records carry no prefill_engine_s (a bench.policies report from before it)")
    return statistics.median(gaps)


def prefill_speeds(router_view: dict[str, Any], cost: CostModel,
                   since: dict[str, Any] | None = None) -> tuple[float, ...]:
    """Each prefill replica's measured rate over the profile's, fastest first: over the
    workload alone where the report has the replica's counters from before it (``since``,
    the router's view after bench.policies' warm-up), else its mean over the replica's life,
    else the router's windowed rate at the end of the run."""
    before = (since or {}).get("replicas", {})
    rates = []
    for name, v in router_view.get("replicas", {}).items():
        if "prefill_tps" not in v:
            continue
        start, end = before.get(name, {}).get("prefill_counted"), v.get("prefill_counted")
        if start and end and end[1] - start[1] > 0.5:  # busy seconds of the workload's own
            rates.append((end[0] - start[0]) / (end[1] - start[1]))
        else:
            rates.append(v.get("prefill_tps_mean") or v["prefill_tps"])
    return tuple(sorted((tps / cost.prefill_tps() for tps in rates), reverse=True))


def _p(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def _simulate_run(name: str, run: dict[str, Any], overhead_s: float, args: dict[str, Any], cost: CostModel,
                  shared_core: bool) -> tuple[list[float], list[float], tuple[float, ...]]:
    """One policy run replayed: (simulated TTFTs, measured TTFTs, the prefill speeds used)."""
    system_len, systems = int(args["system_len"]), int(args["system_prompts"])
    model = replace(cost, prefill_step_s=0.0, same_node_token_s=0.0, remote_token_s=0.0,
                    request_overhead_s=overhead_s)
    speeds = prefill_speeds(run.get("router_view", {}), model, run.get("router_view_warm"))
    reqs = [CalibrationRequest(((f"sys{r['conv'] % systems}", system_len),
                                (f"conv{r['conv']}", r["prompt_tokens"] - system_len)),
                               max(r["output_tokens"], 2), r["sent_s"]) for r in run["records"]]
    if shared_core:
        speeds = (speeds[0], speeds[0])
    sim = simulated_ttft(reqs, name, model, prefill_speeds=speeds, shared_cores=((1, 0),) if shared_core else ())
    return sim, [r["ttft_s"] for r in run["records"]], speeds


def _check(sim: Sequence[float], real: Sequence[float]) -> dict[str, Any]:
    return {"requests": len(real),
            "measured_p50_s": round(_p(real, 50), 4), "sim_p50_s": round(_p(sim, 50), 4),
            "measured_p90_s": round(_p(real, 90), 4), "sim_p90_s": round(_p(sim, 90), 4),
            "p50_ratio": round(_p(sim, 50) / _p(real, 50), 3), "p90_ratio": round(_p(sim, 90) / _p(real, 90), 3)}


def check_rounds(args: dict[str, Any], rounds: Sequence[dict[str, Any]], cost: CostModel = CPU_SMOLLM2,
                 shared_core: bool = False) -> dict[str, Any]:
    """Simulated against measured TTFT p50/p90 for every policy, each round replayed with
    what was measured in it (each replica's rate, and the overhead outside the engine taken
    from the round's OTHER policies: leave one out), then pooled over the rounds, as
    bench.policies pools its measured figures. Per round figures are kept beside the pooled
    ones: a round of 64 requests puts its p90 on the 7th slowest request.

    ``shared_core``: model bench.policies' layout as a mechanism instead of two measured
    speeds: both prefill replicas at the faster one's rate, the second at half of it while
    the decode replica (on its core) has work."""
    sims: dict[str, list[float]] = {}
    reals: dict[str, list[float]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for rd in rounds:
        runs = {name: run for name, run in rd.items() if run.get("records")}
        overhead = {name: outside_engine_s(run["records"]) for name, run in runs.items()}
        for name, run in runs.items():
            others = [v for k, v in overhead.items() if k != name] or [overhead[name]]
            used = statistics.median(others)
            sim, real, speeds = _simulate_run(name, run, used, args, cost, shared_core)
            sims.setdefault(name, []).extend(sim)
            reals.setdefault(name, []).extend(real)
            m = meta.setdefault(name, {"overhead_s": [], "own_overhead_s": [], "prefill_speeds": [], "rounds": []})
            m["overhead_s"].append(round(used, 4))
            m["own_overhead_s"].append(round(overhead[name], 4))
            m["prefill_speeds"].append([round(x, 3) for x in speeds])
            m["rounds"].append(_check(sim, real))
    out: dict[str, Any] = {}
    for name in sims:
        m = meta[name]
        single = len(m["rounds"]) == 1
        out[name] = {**_check(sims[name], reals[name]),
                     "overhead_s": m["overhead_s"][0] if single else m["overhead_s"],
                     "own_overhead_s": m["own_overhead_s"][0] if single else m["own_overhead_s"],
                     "prefill_speeds": m["prefill_speeds"][0] if single else m["prefill_speeds"],
                     **({} if single else {"rounds": m["rounds"]})}
    return out


def check_runs(report: dict[str, Any], cost: CostModel = CPU_SMOLLM2, shared_core: bool = False) -> dict[str, Any]:
    """``check_rounds`` over a bench.policies report: all its rounds where it has them, else
    its one run per policy."""
    rounds = report.get("rounds") or [report["policies"]]
    return check_rounds(report["args"], rounds, cost, shared_core)


def table(checks: dict[str, Any]) -> str:
    lines = ["| policy | measured TTFT p50 / p90 ms | simulated p50 / p90 ms | sim / measured p50 | p90 |"
             " per round p50 · p90 | overhead used ms | prefill speeds |", "|---|---:|---:|---:|---:|---|---:|---|"]
    for name, c in checks.items():
        per_round = ", ".join(f"{r['p50_ratio']:.2f} · {r['p90_ratio']:.2f}" for r in c.get("rounds", ()))
        overhead = c["overhead_s"] if isinstance(c["overhead_s"], list) else [c["overhead_s"]]
        lines.append(f"| {name} | {c['measured_p50_s'] * 1e3:.0f} / {c['measured_p90_s'] * 1e3:.0f} | "
                     f"{c['sim_p50_s'] * 1e3:.0f} / {c['sim_p90_s'] * 1e3:.0f} | {c['p50_ratio']:.2f} | "
                     f"{c['p90_ratio']:.2f} | {per_round or '-'} | "
                     f"{' / '.join(f'{o * 1e3:.0f}' for o in overhead)} | {c['prefill_speeds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.calibrate",
                                description="simulated vs measured TTFT for a bench.policies report")
    p.add_argument("report", type=Path, nargs="?", default=Path("bench/results/policies.json"))
    p.add_argument("--out", type=Path, default=Path("bench/results/calibration.json"))
    p.add_argument("--shared-core", action="store_true",
                   help="core sharing as a mechanism (see check_runs) instead of two measured speeds")
    args = p.parse_args(argv)
    report = json.loads(args.report.read_text())
    checks = check_runs(report, shared_core=args.shared_core)
    args.out.write_text(json.dumps({"report": str(args.report), "report_when": report.get("when"),
                                    "report_commit": report.get("commit"), "profile": CPU_SMOLLM2.name,
                                    "shared_core": args.shared_core,
                                    "checks": checks}, indent=1) + "\n")
    print(table(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
