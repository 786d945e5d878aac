"""A bounded soak of a running pdserve cluster: steady mixed load, bad input among it, and an
engine replica killed every few minutes; at the end, what was lost and what grew.

    pdserve up                                   # loopback only: the soak kills processes here
    .venv/bin/python -m bench.soak --minutes 20 [--kill-every-s 240] [--concurrency 4]

Workers send, in a closed loop, greedy completions and chats (streamed and not, over a few
shared prefixes so the store is used) and bad requests (malformed JSON, invalid UTF-8, out
of range fields, unknown model, unsupported n). A killer SIGKILLs the pool replicas in turn
(prefill, decode, ...). Every request is classified:

    served     a good request answered 200 (a stream ending in [DONE], no error event)
    lost       a good request answered anything else, or a connection or stream error
    refused    a bad request answered with an OpenAI-style 4xx (what it should get)
    5xx        any 5xx, good request or bad

and a sampler follows, every 10 s, the resident memory of the serving processes (Serve
replicas and their engine processes), the engines' and the store's shared memory, and Redis'
key count. The report (markdown on stdout, JSON at ``--out``) gives the totals and the first,
last and largest of each sample: flat means the last is near the first once warm.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from cluster.runtime import RunState, serve_replica_pids

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
_STORY = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, counting each of the "
          "one hundred and twelve steps as his father had taught him. ")
PREFIXES = [_STORY * k for k in (1, 2, 3)]
BAD_BODIES: list[bytes] = [
    b"{not json", b"\xff\xfe\x00", b"[]", b'{"model": 1}', b'{"model": "x", "prompt": "hi"}',
    b'{"prompt": "hi", "max_tokens": -1}', b'{"prompt": "hi", "max_tokens": 100000000}',
    b'{"prompt": "hi", "n": 5}', b'{"prompt": "hi", "temperature": 9}', b'{"messages": []}',
    b'{"prompt": "hi", "stream": true, "stream_options": 7}',
]


@dataclass
class Tally:
    served: int = 0
    lost: int = 0
    refused: int = 0
    server_errors: int = 0
    kills: list[str] = field(default_factory=list)
    lost_examples: list[str] = field(default_factory=list)

    def lose(self, why: str) -> None:
        self.lost += 1
        if len(self.lost_examples) < 20:
            self.lost_examples.append(why[:300])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--kill-every-s", type=float, default=240.0, help="seconds between replica kills; 0 = none")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--bad-share", type=float, default=0.2, help="share of requests that are bad input")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/soak.json")
    return p.parse_args(argv)


async def good_request(client: httpx.AsyncClient, model: str, rng: random.Random, tally: Tally) -> None:
    stream = rng.random() < 0.5
    text = rng.choice(PREFIXES) + f"Question {rng.randrange(50)}: what happened next?"
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(8, 48), "temperature": 0, "stream": stream}
    if rng.random() < 0.5:
        path, body["prompt"] = "/completions", text
    else:
        path, body["messages"] = "/chat/completions", [{"role": "user", "content": text}]
    try:
        if not stream:
            r = await client.post(path, json=body)
            if r.status_code >= 500:
                tally.server_errors += 1
            if r.status_code == 200 and r.json().get("choices"):
                tally.served += 1
            else:
                tally.lose(f"{r.status_code} {r.text}")
            return
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                tally.server_errors += r.status_code >= 500
                tally.lose(f"{r.status_code} {(await r.aread()).decode(errors='replace')}")
                return
            done, error = False, ""
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"error"' in line[:20]:
                    error = line
            if done and not error:
                tally.served += 1
            else:
                tally.lose(error or "stream ended without [DONE]")
    except httpx.HTTPError as e:
        tally.lose(f"{type(e).__name__}: {e}")


async def bad_request(client: httpx.AsyncClient, model: str, rng: random.Random, tally: Tally) -> None:
    raw = rng.choice(BAD_BODIES)
    if b'"model"' not in raw:  # name the served model, so what is wrong is the field under test
        raw = raw.replace(b'"prompt"', f'"model": "{model}", "prompt"'.encode(), 1)
    path = rng.choice(["/completions", "/chat/completions"])
    try:
        r = await client.post(path, content=raw, headers={"content-type": "application/json"})
    except httpx.HTTPError as e:
        tally.lose(f"bad input, {type(e).__name__}: {e}")
        return
    if r.status_code >= 500:
        tally.server_errors += 1
    try:
        shaped = "error" in r.json()
    except ValueError:
        shaped = False
    if 400 <= r.status_code < 500 and shaped:
        tally.refused += 1
    else:
        tally.lose(f"bad input answered {r.status_code}: {r.text}")


def serving_rss_mib(app: str) -> float:
    """Resident memory of the Serve replicas of ``app`` and every process under them."""
    roots = set(serve_replica_pids(app, ""))
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    total, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def shm_mib(prefix: str) -> float:
    return round(sum(p.stat().st_size for p in SHM.glob(f"{prefix}*") if p.is_file()) / (1 << 20), 1)


async def sampler(state: RunState, stop: asyncio.Event, samples: list[dict[str, Any]]) -> None:
    r = redis.Redis.from_url(state.redis_url)
    t0 = time.monotonic()
    while not stop.is_set():
        try:
            keys = int(r.dbsize())
        except redis.RedisError:
            keys = -1
        samples.append({"t_s": round(time.monotonic() - t0), "rss_mib": serving_rss_mib(state.app_name),
                        "engine_shm_mib": shm_mib("psm_"), "store_shm_mib": shm_mib("pdkv-"), "redis_keys": keys})
        try:
            await asyncio.wait_for(stop.wait(), 10)
        except TimeoutError:
            pass


async def killer(app: str, every_s: float, stop: asyncio.Event, tally: Tally) -> None:
    roles = ["prefill", "decode"]
    while every_s > 0:
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except TimeoutError:
            pass
        role = roles[len(tally.kills) % 2]
        pids = serve_replica_pids(app, role)
        if pids:
            os.kill(random.choice(pids), signal.SIGKILL)
            tally.kills.append(f"{role} at {time.strftime('%H:%M:%S')}")


async def soak(args: argparse.Namespace, state: RunState) -> tuple[Tally, list[dict[str, Any]], float]:
    base = state.url.rstrip("/")  # the OpenAI base URL, .../v1
    model = httpx.get(f"{base}/models", timeout=30).json()["data"][0]["id"]
    tally, samples, stop = Tally(), [], asyncio.Event()
    deadline = time.monotonic() + args.minutes * 60

    async def worker(i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            while time.monotonic() < deadline:
                if rng.random() < args.bad_share:
                    await bad_request(client, model, rng, tally)
                else:
                    await good_request(client, model, rng, tally)

    side = [asyncio.create_task(sampler(state, stop, samples)),
            asyncio.create_task(killer(state.app_name, args.kill_every_s, stop, tally))]
    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    stop.set()
    await asyncio.gather(*side)
    return tally, samples, time.monotonic() - t0


def summary(tally: Tally, samples: list[dict[str, Any]], sent: int, elapsed_s: float) -> dict[str, Any]:
    def track(key: str) -> dict[str, float]:
        xs = [s[key] for s in samples]
        warm = xs[len(xs) // 5:] or xs  # past the first fifth: engines and caches warmed up
        return {"first_warm": warm[0], "last": xs[-1], "max": max(xs)} if xs else {}

    return {"minutes": round(elapsed_s / 60, 1), "requests": sent, "served": tally.served, "lost": tally.lost,
            "bad_inputs_refused": tally.refused, "server_errors": tally.server_errors, "kills": tally.kills,
            "rss_mib": track("rss_mib"), "engine_shm_mib": track("engine_shm_mib"),
            "store_shm_mib": track("store_shm_mib"), "redis_keys": track("redis_keys"),
            "lost_examples": tally.lost_examples}


def markdown(s: dict[str, Any]) -> str:
    rows = [("minutes", s["minutes"]), ("replica kills", len(s["kills"])), ("requests sent", s["requests"]),
            ("good requests served", s["served"]), ("requests lost (target 0)", s["lost"]),
            ("bad inputs tried, refused with a 4xx", s["bad_inputs_refused"]),
            ("5xx seen (target 0)", s["server_errors"])]
    for key, label in (("rss_mib", "serving RSS, MiB"), ("engine_shm_mib", "engine shared memory, MiB"),
                       ("store_shm_mib", "store shared memory, MiB"), ("redis_keys", "Redis keys")):
        t = s[key]
        if t:
            rows.append((f"{label}: warm / last / max", f"{t['first_warm']} / {t['last']} / {t['max']}"))
    return "\n".join(["| soak | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state = RunState.load()
    if state is None or not state.url:
        raise SystemExit("no running cluster: start one with `pdserve up` (PDSERVE_HOME selects which)")
    tally, samples, elapsed = asyncio.run(soak(args, state))
    sent = tally.served + tally.lost + tally.refused
    result = summary(tally, samples, sent, elapsed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    report = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit,
              "args": {k: str(v) for k, v in vars(args).items()}, **result, "samples": samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(result))
    print(f"raw figures: {args.out}")
    return 0 if result["lost"] == 0 and result["server_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
