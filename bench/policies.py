"""Routing policies side by side on real engines: 2 prefill + 1 decode replicas, a
shared-prefix multi-turn chat workload, one cluster per policy, the same requests for each.

    .venv/bin/python -m bench.policies [--policies kv_aware,prefix_tree_approx,round_robin,least_loaded]
                                       [--conversations 8] [--turns 4] [--concurrency 4]
                                       [--rounds 1] [--out bench/results/policies.json]

The workload: each conversation opens with one of a few long system prompts and resends its
whole history every turn (earlier user turns and the model's own answers, as token ids),
so most of every prompt was computed before, by some prefill replica, and is in that
replica's own cache and in the node's store. The cores (2 here) are split so the two prefill
replicas are unequal: prefill 0 has core 0 to itself, prefill 1 shares core 1 with decode:
a policy that measures replicas sees that, one that counts requests does not.

Per policy: TTFT p50/p90 (the routing decides where the prompt is computed, so TTFT is where
policies differ), prefix hit rate (prompt tokens the prefill replica took from its own cache
or the store instead of computing) and how requests split over the prefill replicas.

Before the workload each cluster serves unmeasured prompts that share nothing with it until
both prefill replicas have computed one (``warm_up``): an engine's first forward pays one-off
costs (run 10: 2.7 s for a prompt that took 0.7 s later), which would otherwise land on
whichever measured request a policy happened to send there first. The calibration takes each
replica's speed over the workload alone (the router's counters after the warm-up and at the end).

The policies run one after another, so a slower stretch of this shared machine lands on
whichever ran then (run 6: the same core-0 replica measured 137 tokens/s under one policy and
176 under the next). ``--rounds R`` interleaves them: each round runs every policy once, in an
order rotated by one each round, on conversations of their own (seed + round); the report
pools each policy's requests over the rounds and gives kv_aware's TTFT ratio to each other
policy per round (the rounds' median beside the pooled figures).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.client import Prompt, request_body, stream_one, wordlike_vocab
from bench.load.report import prefix_hit_rate
from bench.servers import pdserve_system
from bench.stats import RequestResult, percentile

REPO = Path(__file__).resolve().parents[1]
PREFILL_REPLICAS = 2
LAYOUT = [  # 2 prefill replicas (core 0, core 1) + 1 decode replica (core 1); prefix caches on.
    # Ray's CPU count is 2: the prefill replicas reserve half a CPU each (pinning, not Ray's
    # accounting, decides which core an engine runs on).
    f"prefill.replicas={PREFILL_REPLICAS}", "prefill.cpus_per_replica=0.5", "prefill.cpu_binding=['0','1']",
    "decode.cpu_binding=['1']",
    "prefill.engine.max_model_len=2048", "decode.engine.max_model_len=2048",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.policies", description=__doc__.split("\n")[0])
    p.add_argument("--policies", default="kv_aware,prefix_tree_approx,round_robin,least_loaded")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-prompts", type=int, default=2)
    p.add_argument("--system-len", type=int, default=320, help="tokens per system prompt")
    p.add_argument("--user-len", type=int, default=48, help="tokens per user turn")
    p.add_argument("--output-len", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=4, help="conversations in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="each policy once a round, the order rotated")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the default model)")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/policies.json")
    return p.parse_args(argv)


def conversations(args: argparse.Namespace, vocab: list[int], seed: int) -> list[tuple[list[int], list[list[int]]]]:
    """(system prompt, user turns) per conversation, fixed by the seed."""
    rng = random.Random(seed)
    systems = [[rng.choice(vocab) for _ in range(args.system_len)] for _ in range(args.system_prompts)]
    return [(systems[i % len(systems)], [[rng.choice(vocab) for _ in range(args.user_len)]
                                         for _ in range(args.turns)]) for i in range(args.conversations)]


async def run_workload(base_url: str, model: str, convs: list[tuple[list[int], list[list[int]]]],
                       output_len: int, concurrency: int) -> list[tuple[int, RequestResult]]:
    """Each conversation's turns in order (a turn needs the previous answer); up to
    ``concurrency`` conversations at once."""
    url = base_url.rstrip("/") + "/completions"
    results: list[tuple[int, RequestResult]] = []  # (conversation, result)
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, conv: int, system: list[int], turns: list[list[int]]) -> None:
        async with sem:
            history = list(system)
            for user in turns:
                history += user
                res = await stream_one(client, url, request_body(model, Prompt(list(history), output_len)), 600)
                results.append((conv, res))
                if not res.ok:
                    return
                history += res.output_ids

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, i, s, t) for i, (s, t) in enumerate(convs)))
    return results


async def warm_up(base_url: str, model: str, vocab: list[int], prompt_len: int, output_len: int,
                  replicas: int, seed: int, most: int = 4) -> list[str]:
    """Unmeasured pairs of prompts that share nothing with the workload, until every prefill
    replica has served one (or ``most`` pairs): an engine's first forward pays one-off costs
    (run 10: 2.7 s for a cold 368-token prompt that took 0.7 s a minute later), which would
    land on whichever measured request a policy happened to send there first. The prefill
    replicas that served them, in order."""
    url = base_url.rstrip("/") + "/completions"
    rng = random.Random(seed)
    served: list[str] = []
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(most):
            bodies = [request_body(model, Prompt([rng.choice(vocab) for _ in range(prompt_len)], output_len))
                      for _ in range(2)]
            for res in await asyncio.gather(*(stream_one(client, url, b, 600) for b in bodies)):
                if not res.ok:
                    raise RuntimeError(f"warm-up request failed: {res.error}")
                served.append(str(res.trace.get("prefill_replica", "?")))
            if len(set(served)) >= replicas:
                break
    return served


def summarize(runs: list[tuple[int, RequestResult]]) -> dict[str, Any]:
    results = [r for _, r in runs]
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    split = Counter(str(r.trace.get("prefill_replica", "?")) for r in ok)
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
        "prefix_hit_rate": prefix_hit_rate(results),
        "prefill_split": sorted(split.values(), reverse=True),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
    }


def records(runs: list[tuple[int, RequestResult]]) -> list[dict[str, Any]]:
    """Per request, what the simulator's calibration replays (``bench.sim.calibrate``)."""
    ok = [(conv, r) for conv, r in runs if r.ok and r.ttft_s is not None]
    t0 = min((r.sent_at for _, r in ok), default=0.0)
    return [{"conv": conv, "sent_s": round(r.sent_at - t0, 4), "prompt_tokens": r.prompt_tokens,
             "output_tokens": r.n_out, "ttft_s": round(r.ttft_s or 0.0, 4),
             "prefill_engine_s": r.trace.get("prefill_engine_s"),
             "cached_tokens": r.trace.get("prefill_cached_tokens"),
             "prefill_replica": r.trace.get("prefill_replica")} for conv, r in ok]


def prefill_decisions(base_url: str) -> list[dict[str, Any]]:
    """The router's prefill decisions so far, in the order made."""
    routes = httpx.get(base_url.rstrip("/").removesuffix("/v1") + "/debug/routes?last=1000", timeout=30).json()
    return [r["prefill"] for r in routes if "prefill" in r]


def own_cache_seen(base_url: str, skip: int = 0) -> dict[str, Any]:
    """How often the router saw the chosen prefill replica's own cache holding part of the
    prompt (kv_aware's candidates carry ``own_tokens``, from the engines' KV events): shows
    the event feed working on real engines. The first ``skip`` decisions (before the workload)
    are left out."""
    chosen = prefill_decisions(base_url)[skip:]
    own = [next((c.get("own_tokens", 0) for c in d["candidates"] if c["replica"] == d["chosen"]), 0) for d in chosen]
    return {"decisions_with_own_cache": sum(1 for t in own if t > 0), "decisions": len(own),
            "own_cache_tokens": sum(own),
            # Each prefill decision in the order made, its candidates' terms (what a slow
            # request was routed on: bench/results/policies_run*.json, "routes").
            "routes": [{"chosen": d["chosen"], "why": d["why"], "candidates": d["candidates"]} for d in chosen]}


def table(report: dict[str, Any]) -> str:
    rows = report["policies"]
    lines = ["| policy | TTFT p50 ms | TTFT p90 ms | prefix hit rate | requests per prefill replica | failed |",
             "|---|---:|---:|---:|---|---:|"]
    for name, s in rows.items():
        if "error" in s:
            lines.append(f"| {name} | error: {s['error'][:60]} | | | | |")
            continue
        lines.append(f"| {name} | {s['ttft_p50_s'] * 1e3:.0f} | {s['ttft_p90_s'] * 1e3:.0f} | "
                     f"{s['prefix_hit_rate']:.1%} | {' / '.join(map(str, s['prefill_split']))} | {s['failed']} |")
    base = rows.get("kv_aware")
    if base and "error" not in base:
        lines += ["", "| kv_aware / policy | TTFT p50 | TTFT p90 |", "|---|---:|---:|"]
        for name, s in rows.items():
            if name != "kv_aware" and "error" not in s:
                lines.append(f"| {name} | {base['ttft_p50_s'] / s['ttft_p50_s']:.2f}x | "
                             f"{base['ttft_p90_s'] / s['ttft_p90_s']:.2f}x |")
    per_round = report.get("round_ratios")
    if per_round:
        lines += ["", f"| kv_aware / policy, per round ({len(report['rounds'])}) | TTFT p50: median (each round) "
                      "| TTFT p90: median (each round) |", "|---|---|---|"]
        for name, r in per_round.items():
            lines.append(f"| {name} | {r['p50_median']:.2f}x ({', '.join(f'{x:.2f}' for x in r['p50'])}) | "
                         f"{r['p90_median']:.2f}x ({', '.join(f'{x:.2f}' for x in r['p90'])}) |")
    return "\n".join(lines)


Conversations = list[tuple[list[int], list[list[int]]]]  # (system prompt, user turns) each


def run_policy(args: argparse.Namespace, model_dir: Path, vocab: list[int], policy: str,
               convs: Conversations) -> tuple[dict[str, Any], list[tuple[int, RequestResult]]]:
    """One fresh cluster routed by ``policy``, the workload through it: its report and results."""
    with tempfile.TemporaryDirectory(prefix=f"pdbench-{policy}-") as logs:
        t0 = time.monotonic()
        try:
            with pdserve_system(model_dir, model_dir.name, Path(logs),
                                [*LAYOUT, f"router.policy={policy}"]) as running:
                warmed = asyncio.run(warm_up(running.base_url, model_dir.name, vocab,
                                             args.system_len + args.user_len, args.output_len,
                                             PREFILL_REPLICAS, args.seed + 10_000))
                time.sleep(2.0)  # a few stats periods (0.5 s): the warm-up's counters reach the router
                before = len(prefill_decisions(running.base_url))
                root = running.base_url.rstrip("/").removesuffix("/v1")
                warm_view = httpx.get(root + "/debug/replicas", timeout=30).json()
                results = asyncio.run(run_workload(running.base_url, model_dir.name, convs,
                                                   args.output_len, args.concurrency))
                seen = {**own_cache_seen(running.base_url, skip=before), "warm_up": warmed}
                measured = httpx.get(root + "/debug/replicas", timeout=30).json()
            return ({**summarize(results), **seen, "wall_s": round(time.monotonic() - t0, 1),
                     "router_view": measured, "router_view_warm": warm_view, "records": records(results)}, results)
        except Exception as e:  # one policy failing still reports the others
            return {"error": f"{type(e).__name__}: {e}"}, []


def round_ratios(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """kv_aware's TTFT p50 and p90 over each other policy's, per round (rounds where both ran)."""
    out: dict[str, dict[str, Any]] = {}
    others = {name for rd in rounds for name in rd if name != "kv_aware"}
    for name in sorted(others):
        pairs = [(rd["kv_aware"], rd[name]) for rd in rounds
                 if "error" not in rd.get("kv_aware", {"error": 1}) and "error" not in rd.get(name, {"error": 1})]
        if not pairs:
            continue
        p50 = [round(k["ttft_p50_s"] / o["ttft_p50_s"], 3) for k, o in pairs]
        p90 = [round(k["ttft_p90_s"] / o["ttft_p90_s"], 3) for k, o in pairs]
        out[name] = {"p50": p50, "p90": p90, "p50_median": statistics.median(p50),
                     "p90_median": statistics.median(p90)}
    return out


def main(argv: list[str] | None = None) -> int:
    from cluster.model import prepare_default_model

    args = parse_args(argv)
    model_dir = Path(args.model) if args.model else prepare_default_model()
    vocab = wordlike_vocab(model_dir)
    report: dict[str, Any] = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                       capture_output=True, text=True).stdout.strip(),
                              "args": {k: str(v) for k, v in vars(args).items()}, "policies": {}}
    names = args.policies.split(",")
    rounds: list[dict[str, Any]] = []
    pooled: dict[str, list[tuple[int, RequestResult]]] = {name: [] for name in names}
    for r in range(args.rounds):
        convs = conversations(args, vocab, args.seed + r)
        this: dict[str, Any] = {}
        for policy in names[r % len(names):] + names[: r % len(names)]:
            this[policy], results = run_policy(args, model_dir, vocab, policy, convs)
            pooled[policy] += results
            brief = {k: v for k, v in this[policy].items() if k not in ("records", "routes", "router_view_warm")}
            print(f"[policies] round {r}: {policy}: {brief}", flush=True)
        rounds.append(this)
    if args.rounds == 1:
        report["policies"] = rounds[0]
    else:
        report["rounds"] = rounds
        report["round_ratios"] = round_ratios(rounds)
        for name in names:  # pooled over the rounds
            ran = [rd[name] for rd in rounds if "error" not in rd[name]]
            report["policies"][name] = {**summarize(pooled[name]), "rounds_ok": len(ran)} if ran else rounds[0][name]
    from bench.sim.calibrate import check_rounds
    from bench.sim.calibrate import table as calibration_table

    report["calibration"] = check_rounds(report["args"], rounds)  # each round replayed, pooled as above
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(calibration_table(report["calibration"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
