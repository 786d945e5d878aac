"""What ``pdserve bench`` sends: sessions of turns, built from a seed, as token ids.

A workload is a list of ``Session``s. A session is one or more turns sent in order, each
after the previous one's answer (a turn's prompt is the session's history so far: earlier
prompts, the model's own answers, then the turn's new tokens), and its first turn has an
arrival time when the run is open-loop. Independent requests are sessions of one turn.

- ``random``: prompts of random length, no shared prefix (vLLM's ``random`` dataset).
- ``shared_prefix``: one of a few long system prompts, then a random question.
- ``multiturn``: chat over shared system prompts; every turn resends the whole history.
- ``trace``: replay of a JSONL trace in Mooncake's published format (``timestamp`` ms,
  ``input_length``, ``output_length``, ``hash_ids``): requests that share a leading hash id
  share that block of prompt, ``tokens_per_id`` tokens per id (Mooncake's blocks are 512
  tokens; a small CPU model wants far fewer), lengths scaled by the same factor.

Prompts are token ids drawn from the model's ordinary words (``bench.client.wordlike_vocab``),
so every server sees exactly the same prompt lengths.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id in Mooncake's published traces


@dataclass(frozen=True)
class Turn:
    new_tokens: list[int]  # appended to the history (the whole prompt for a session's first turn)
    max_tokens: int


@dataclass
class Session:
    turns: list[Turn]
    arrival_s: float = 0.0  # when its first turn is sent, from the run's start (open loop)
    tag: str = ""  # which system prompt / trace line, for the report
    group: int = field(default=-1)  # the shared prefix it draws on (-1: none)


@dataclass(frozen=True)
class Shape:
    """Lengths for the synthetic workloads, in tokens."""

    requests: int = 32  # sessions (conversations for multiturn)
    input_len: int = 256  # random: mean prompt; shared_prefix / multiturn: the question
    output_len: int = 32
    jitter: float = 0.25  # lengths drawn from len * U[1 - jitter, 1 + jitter]
    system_prompts: int = 2
    system_len: int = 512
    turns: int = 4


class Drawer:
    def __init__(self, vocab: Sequence[int], seed: int) -> None:
        if not vocab:
            raise ValueError("an empty vocabulary")
        self.vocab, self.rng = list(vocab), random.Random(seed)

    def tokens(self, n: int) -> list[int]:
        return [self.rng.choice(self.vocab) for _ in range(n)]

    def length(self, mean: int, jitter: float) -> int:
        lo = max(1, round(mean * (1 - jitter)))
        return self.rng.randint(lo, max(lo, round(mean * (1 + jitter))))


def random_workload(vocab: Sequence[int], shape: Shape, seed: int) -> list[Session]:
    d = Drawer(vocab, seed)
    return [Session([Turn(d.tokens(d.length(shape.input_len, shape.jitter)), shape.output_len)], tag="random")
            for _ in range(shape.requests)]


def shared_prefix_workload(vocab: Sequence[int], shape: Shape, seed: int) -> list[Session]:
    """One turn each: a shared system prompt and a random question (multiturn's first turns)."""
    return multiturn_workload(vocab, replace(shape, turns=1), seed)


def multiturn_workload(vocab: Sequence[int], shape: Shape, seed: int) -> list[Session]:
    d = Drawer(vocab, seed)
    systems = [d.tokens(shape.system_len) for _ in range(shape.system_prompts)]
    out = []
    for i in range(shape.requests):
        g = i % len(systems)
        turns = [Turn(systems[g] + d.tokens(d.length(shape.input_len, shape.jitter)), shape.output_len)]
        turns += [Turn(d.tokens(d.length(shape.input_len, shape.jitter)), shape.output_len)
                  for _ in range(shape.turns - 1)]
        out.append(Session(turns, tag=f"system{g}", group=g))
    return out


@dataclass(frozen=True)
class TraceScale:
    tokens_per_id: int = 16  # prompt tokens per hash id (Mooncake's: 512)
    max_output: int = 64  # output tokens are scaled like input, then capped here
    time_scale: float = 1.0  # arrival gaps are multiplied by this (0.5 = twice as fast)
    limit: int = 0  # first N lines only (0 = all)


def trace_workload(vocab: Sequence[int], path: str | Path, scale: TraceScale, seed: int) -> list[Session]:
    """A Mooncake-format trace: each hash id stands for one block of prompt, the same block
    wherever the id appears, so shared leading ids are a shared prefix."""
    d = Drawer(vocab, seed)
    blocks: dict[int, list[int]] = {}
    factor = scale.tokens_per_id / MOONCAKE_BLOCK_TOKENS
    out: list[Session] = []
    t0: float | None = None
    for n, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        if scale.limit and len(out) >= scale.limit:
            break
        try:
            rec = json.loads(line)
            ts, in_len, out_len = float(rec["timestamp"]), int(rec["input_length"]), int(rec["output_length"])
            ids = [int(h) for h in rec["hash_ids"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n + 1}: not a Mooncake trace line ({e}): {line[:120]}") from e
        prompt: list[int] = []
        for h in ids:
            if h not in blocks:
                blocks[h] = d.tokens(scale.tokens_per_id)
            prompt += blocks[h]
        # The last block of a trace request is usually partial: cut to the scaled length.
        want = max(1, round(in_len * factor))
        prompt = prompt[:want] if len(prompt) >= want else prompt + d.tokens(want - len(prompt))
        t0 = ts if t0 is None else t0
        out.append(Session([Turn(prompt, max(1, min(scale.max_output, round(out_len * factor))))],
                           arrival_s=(ts - t0) / 1000.0 * scale.time_scale, tag=f"line{n + 1}",
                           group=ids[0] if ids else -1))
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def poisson_arrivals(sessions: list[Session], rate: float, seed: int) -> list[Session]:
    """Open loop: sessions arrive as a Poisson process of ``rate`` per second (a session's
    later turns follow its answers, not the clock)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng, t = random.Random(seed ^ 0x5EED), 0.0
    for s in sessions:
        s.arrival_s = t
        t += rng.expovariate(rate)
    return sessions
