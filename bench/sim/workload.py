"""Workloads in Mooncake's published trace format, and the requests the simulator replays.

A trace is JSONL, one request a line (github.com/kvcache-ai/Mooncake, FAST25-release/traces):

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

``timestamp`` in milliseconds, one ``hash_ids`` entry per block of ``tokens_per_id`` prompt
tokens (512 in Mooncake's traces; the last block may be partial). Equal ids mean equal
content; a prompt's chunk keys are a chain over its ids, so a key names the whole prefix up
to its chunk, exactly as ``kvstore.hashing`` chains over token ids:

    key_0 = blake2b(seed    || id_0 || sub-chunk 0)
    key_i = blake2b(key_i-1 || id_j || sub-chunk s)     (tokens_per_id / chunk_tokens per id)

Only full chunks get keys, as in the store.

Arrivals are open loop: the trace's timestamps times a scale, or Poisson at a given rate.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

KEY_BYTES = 16  # as kvstore.hashing
_SEED = hashlib.blake2b(b"pdserve-sim", digest_size=KEY_BYTES).digest()
MOONCAKE_TOKENS_PER_ID = 512


@dataclass(frozen=True)
class TraceRequest:
    """One line of a Mooncake-format trace."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def to_json(self) -> str:
        ts = int(self.timestamp_ms) if float(self.timestamp_ms).is_integer() else self.timestamp_ms
        return json.dumps({"timestamp": ts, "input_length": self.input_length,
                           "output_length": self.output_length, "hash_ids": list(self.hash_ids)})


@dataclass(frozen=True)
class SimRequest:
    """What the simulator replays: sizes, arrival time and the prompt's chunk keys."""

    rid: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    keys: tuple[bytes, ...]  # chained keys of the prompt's full chunks


class TraceFormatError(ValueError):
    pass


def parse_line(line: str, where: str = "") -> TraceRequest:
    try:
        obj = json.loads(line)
        ids = obj["hash_ids"]
        req = TraceRequest(float(obj["timestamp"]), int(obj["input_length"]), int(obj["output_length"]),
                           tuple(int(i) for i in ids))
    except (ValueError, KeyError, TypeError) as e:
        raise TraceFormatError(f"{where}: not a Mooncake trace line ({type(e).__name__}: {e}); expected "
                               "timestamp (ms), input_length, output_length, hash_ids") from None
    if req.input_length <= 0 or req.output_length <= 0:
        raise TraceFormatError(f"{where}: input_length and output_length must be positive")
    return req


def load_trace(path: Path, limit: int | None = None) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                out.append(parse_line(line, f"{path}:{n}"))
                if limit is not None and len(out) >= limit:
                    break
    return out


def write_trace(path: Path, trace: Iterable[TraceRequest]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for req in trace:
            f.write(req.to_json() + "\n")


def chunk_keys(hash_ids: Sequence[int], prompt_tokens: int, tokens_per_id: int, chunk_tokens: int) -> tuple[bytes, ...]:
    """Chained keys of the prompt's full chunks; ``chunk_tokens`` must divide ``tokens_per_id``
    (else one id's content would straddle chunks and a shared id could never fill one)."""
    if tokens_per_id % chunk_tokens:
        raise ValueError(f"tokens per hash id ({tokens_per_id}) must be a multiple of the chunk size "
                         f"({chunk_tokens}), or shared ids never fill a chunk")
    per_id = tokens_per_id // chunk_tokens
    n_full = min(prompt_tokens // chunk_tokens, len(hash_ids) * per_id)
    keys: list[bytes] = []
    parent = _SEED
    for i in range(n_full):
        block, sub = divmod(i, per_id)
        parent = hashlib.blake2b(parent + hash_ids[block].to_bytes(8, "little", signed=True)
                                 + sub.to_bytes(4, "little"), digest_size=KEY_BYTES).digest()
        keys.append(parent)
    return tuple(keys)


KeyCache = dict[tuple[tuple[int, ...], int], tuple[bytes, ...]]


def to_requests(trace: Sequence[TraceRequest], tokens_per_id: int, chunk_tokens: int, time_scale: float = 1.0,
                trace_tokens_per_id: int | None = None, cache: KeyCache | None = None) -> list[SimRequest]:
    """Requests from trace lines, arriving at ``timestamp * time_scale`` (time_scale 0.5 replays
    twice as fast). With ``trace_tokens_per_id`` (Mooncake: 512) lengths are rescaled so each
    id still covers one block of ``tokens_per_id`` tokens (e.g. 32 for a small model).
    ``cache`` keeps each prompt's keys across calls (replaying one trace at several rates)."""
    scale = tokens_per_id / trace_tokens_per_id if trace_tokens_per_id else 1.0
    keys_of: KeyCache = {} if cache is None else cache
    t0 = min((r.timestamp_ms for r in trace), default=0.0)
    out = []
    for i, r in enumerate(sorted(trace, key=lambda r: r.timestamp_ms)):
        n = max(1, round(r.input_length * scale))
        keys = keys_of.get((r.hash_ids, n))
        if keys is None:
            keys = keys_of[(r.hash_ids, n)] = chunk_keys(r.hash_ids, n, tokens_per_id, chunk_tokens)
        out.append(SimRequest(f"r{i}", (r.timestamp_ms - t0) / 1000.0 * time_scale, n, r.output_length, keys))
    return out


def poisson(requests: Sequence[SimRequest], rate: float, seed: int) -> list[SimRequest]:
    """The same requests in the same order, re-timed as a Poisson process at ``rate`` per s."""
    if rate <= 0:
        raise ValueError(f"arrival rate must be positive, got {rate}")
    rng, t, out = random.Random(seed), 0.0, []
    for r in requests:
        out.append(SimRequest(r.rid, t, r.prompt_tokens, r.output_tokens, r.keys))
        t += rng.expovariate(rate)
    return out


def mean_rate(requests: Sequence[SimRequest]) -> float:
    """Arrivals per second over the requests' span."""
    if len(requests) < 2:
        return 0.0
    span = requests[-1].arrival_s - requests[0].arrival_s
    return (len(requests) - 1) / span if span > 0 else 0.0
