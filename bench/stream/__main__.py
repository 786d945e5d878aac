"""The streaming path's cost per token: decode replica -> router replica -> HTTP proxy -> client,
with the decoded tokens on the token channel (``router.decode_stream: channel``) and as items
of Serve's streamed call (``serve``), side by side in one run.

    .venv/bin/python -m bench.stream [--streams 32] [--tokens 200] [--step-ms 10]
                                     [--rounds 3] [--seconds 12] [--out bench/results/stream.json]
                                     [--variants channel,serve]

``--variants`` names the two apps compared: ``DECODE_STREAM[/TRANSPORT]``, e.g.
``channel/grpc,channel/ray`` compares the router's engine calls over Serve's gRPC with Ray
actor calls (``router.serve_transport``; default ``grpc``), both on the token channel. The one
HTTP proxy both apps share calls the routers as ``--proxy-transport`` says (default ``grpc``,
as ``pdserve up`` starts Serve): compare that in two runs.

The subject is the path, not the engine: both apps run the real router (real Ray, Serve,
HTTP, tokenizer, routing) in front of the fake engine replicas of the integration tests,
whose decode replica gives every running sequence a token each ``--step-ms`` (an engine's
step). A closed loop of ``--streams`` streaming completions of ``--tokens`` tokens loads one
app at a time, the two taking turns for ``--rounds`` rounds. Per turn: tokens/s delivered,
each process's CPU per token (router replica, Serve's HTTP proxy, decode replica; from
/proc) and each request's time per output token as the client sees it. What limits the
path on a loaded machine is CPU per token, so the ratios are the headline.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import ray
from ray import serve

from bench.stats import percentile
from cluster.app import controller_options
from cluster.model import prepare_default_model
from cluster.runtime import free_port
from router.app import SERVE_TRANSPORTS, Router, RouterSpec
from tests.integration.fakes import MODEL, ZERO, FakeDecode, FakePrefill, request_router

MODES = ("channel", "serve")
PROCESSES = {"router": "ServeReplica:{app}:router", "proxy": "ProxyActor", "decode": "ServeReplica:{app}:decode"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--streams", type=int, default=32, help="concurrent streaming requests (closed loop)")
    p.add_argument("--tokens", type=int, default=200, help="output tokens per request")
    p.add_argument("--step-ms", type=float, default=10.0, help="the fake decode engine's step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=12.0, help="load per mode per round")
    p.add_argument("--out", type=Path, default=Path("bench/results/stream.json"))
    p.add_argument("--variants", default="channel,serve",
                   help="the two apps compared: DECODE_STREAM[/TRANSPORT], TRANSPORT grpc (default) | ray")
    p.add_argument("--proxy-transport", choices=SERVE_TRANSPORTS, default="grpc",
                   help="how the shared HTTP proxy calls the routers (router.serve_transport)")
    return p.parse_args(argv)


def variants(raw: str) -> list[tuple[str, str, str]]:
    """``--variants`` as (app name, decode_stream, serve_transport), two of them."""
    out = []
    for item in raw.split(","):
        stream, _, calls = item.strip().partition("/")
        calls = calls or "grpc"
        if stream not in MODES or calls not in SERVE_TRANSPORTS:
            raise SystemExit(f"--variants: {item!r} is not DECODE_STREAM[/TRANSPORT] of {MODES} / {SERVE_TRANSPORTS}")
        out.append((f"{stream}-{calls}", stream, calls))
    if len(out) != 2 or out[0][0] == out[1][0]:
        raise SystemExit("--variants: name two different variants")
    return out


def deploy(app: str, mode: str, transport: str, step_s: float) -> str:
    """One app per variant: the real router in front of one fake prefill and one fake decode replica."""
    spec = RouterSpec(model_dir=str(prepare_default_model()), served_model_name=MODEL, max_model_len=4096,
                      default_max_tokens=16, max_body_bytes=64 * 1024, metrics_export_s=0,
                      namespace={"model": "m", "dtype": "float32", "layout": "cpu/bs32", "chunk_tokens": 32},
                      decode_stream=mode, serve_transport=transport)
    prefill = serve.deployment(FakePrefill, name="prefill", request_router_config=request_router("prefill"),
                               ray_actor_options=ZERO).bind()
    decode = serve.deployment(FakeDecode, name="decode", request_router_config=request_router("decode"),
                              max_ongoing_requests=1024, ray_actor_options=ZERO).bind(step_s)
    router = serve.deployment(Router, name="router", max_ongoing_requests=1024, ray_actor_options=ZERO)
    serve.run(router.bind(spec.__dict__, prefill, decode), name=app, route_prefix=f"/{app}")
    return app


def processes(app: str) -> dict[str, psutil.Process]:
    found: dict[str, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        for role, pattern in PROCESSES.items():
            if pattern.format(app=app) in cmd:
                found[role] = proc
    missing = set(PROCESSES) - set(found)
    if missing:
        raise RuntimeError(f"app {app}: no process found for {sorted(missing)}")
    return found


def cpu_s(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {role: sum(p.cpu_times()[:2]) for role, p in procs.items()}


async def stream_one(client: httpx.AsyncClient, url: str, tokens: int) -> tuple[int, float | None]:
    """One streaming completion: (output tokens, seconds per output token after the first).
    Tokens come from the usage block: a chunk may carry several when the router fell behind."""
    body = {"model": MODEL, "prompt": "the quick brown fox " * 8, "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    n, first, last = 0, 0.0, 0.0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
    return n, (last - first) / (n - 1) if n > 1 else None


async def closed_loop(url: str, streams: int, tokens: int, seconds: float) -> tuple[int, float, list[float]]:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        end, total, tpots = time.monotonic() + seconds, 0, []

        async def worker() -> None:
            nonlocal total
            while time.monotonic() < end:
                n, tpot = await stream_one(client, url, tokens)
                total += n
                if tpot is not None:
                    tpots.append(tpot)

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(streams)))
        return total, time.monotonic() - t0, tpots


def ms(seconds: float | None) -> float:
    return round(1e3 * (seconds or 0.0), 2)


def turn(base: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    url = f"{base}/{mode}/v1/completions"
    procs = processes(mode)
    before = cpu_s(procs)
    tokens, wall, tpots = asyncio.run(closed_loop(url, args.streams, args.tokens, args.seconds))
    used = {role: cpu_s(procs)[role] - before[role] for role in procs}
    return {"mode": mode, "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "cpu_us_per_token": {role: round(1e6 * s / tokens, 1) for role, s in used.items()},
            "tpot_ms_p50": ms(percentile(tpots, 50)), "tpot_ms_p99": ms(percentile(tpots, 99)),
            "requests": len(tpots)}


def summary(turns: list[dict[str, Any]], apps: list[str]) -> dict[str, Any]:
    """Per variant, the median over rounds; and the first / the second of each (CPU: below 1 is better)."""
    med: dict[str, dict[str, float]] = {}
    for mode in apps:
        mine = [t for t in turns if t["mode"] == mode]
        med[mode] = {"tokens_per_s": statistics.median(t["tokens_per_s"] for t in mine),
                     "tpot_ms_p50": statistics.median(t["tpot_ms_p50"] for t in mine),
                     "tpot_ms_p99": statistics.median(t["tpot_ms_p99"] for t in mine),
                     **{f"{role}_cpu_us": statistics.median(t["cpu_us_per_token"][role] for t in mine)
                        for role in PROCESSES}}
    first, second = apps
    ratios = {key: round(med[first][key] / med[second][key], 3) for key in med[first]}
    return {"median": med, f"{first}_over_{second}": ratios}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ray.init(num_cpus=2, namespace="bench-stream", log_to_driver=False)
    try:
        port = free_port()
        # The HTTP proxy's calls to the routers as `pdserve up` makes them (--proxy-transport).
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    controller_options=controller_options(args.proxy_transport))
        base = f"http://127.0.0.1:{port}"
        apps = [deploy(app, stream, calls, args.step_ms / 1e3) for app, stream, calls in variants(args.variants)]
        for app in apps:
            asyncio.run(closed_loop(f"{base}/{app}/v1/completions", args.streams, args.tokens, 2.0))  # warm-up
        turns = []
        for r in range(args.rounds):
            for mode in apps if r % 2 == 0 else apps[::-1]:
                t = turn(base, mode, args)
                turns.append({"round": r, **t})
                print(f"round {r} {mode:13s} {t['tokens_per_s']:7.1f} tok/s  cpu us/token "
                      + " ".join(f"{k}={v}" for k, v in t["cpu_us_per_token"].items())
                      + f"  tpot p50/p99 {t['tpot_ms_p50']}/{t['tpot_ms_p99']} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"bench": "stream", "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "cpus": psutil.cpu_count(),
        "turns": turns, **summary(turns, apps)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median"], indent=1))
    print(f"{apps[0]} / {apps[1]}:", json.dumps(result[f"{apps[0]}_over_{apps[1]}"]))


if __name__ == "__main__":
    main()
