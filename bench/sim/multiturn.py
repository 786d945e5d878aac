"""A multi-turn chat workload with shared system prompts, written as a Mooncake-format trace.

Each conversation picks one of a few system prompts (shared by many conversations), then
takes turns; every turn resends the whole history, so its ``hash_ids`` extend the previous
turn's:

    turn 1:  [sys ids ...][u1 ...]                       (last block partial: a fresh id)
    turn 2:  [sys ids ...][u1 ... a1 ... u2 ...]         (the full blocks of turn 1 reappear)

A block that straddles two messages, or was partial in the previous turn, gets a new id once
it fills: its content changed, so its hash would too.

Contents and timing are drawn from separate streams of the seed: the same conversations can
be replayed at any rate (``schedule``), so a rate sweep varies load and not the contents.
Conversation starts are Poisson; each next turn follows ``think_min_s`` plus an exponential
``think_s`` after the previous one, open loop, as in a trace replay. The defaults are an
agent's pace (tool calls and short replies), not a person's: a run must reach a steady state
within the few seconds of traffic that a 512-replica simulation can afford (docs/sim.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.sim.workload import TraceRequest


@dataclass(frozen=True)
class MultiTurnSpec:
    conversations: int
    system_prompts: int = 16
    system_tokens: tuple[int, int] = (1024, 3072)
    user_tokens: tuple[int, int] = (64, 1024)
    output_tokens: tuple[int, int] = (32, 512)
    turns_mean: float = 4.0  # geometric, at least one turn
    turns_max: int = 10
    think_s: float = 0.5  # mean of the exponential part of the gap between turns
    think_min_s: float = 0.25  # the fixed part (the reply has to arrive first)
    tokens_per_id: int = 512
    max_prompt_tokens: int = 32_768  # a conversation ends before its prompt would pass this

    def __post_init__(self) -> None:
        if self.conversations <= 0 or self.system_prompts <= 0 or self.turns_mean < 1:
            raise ValueError("conversations and system_prompts must be positive, turns_mean >= 1")


@dataclass(frozen=True)
class Turn:
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    gaps_s: tuple[float, ...]  # before each turn after the first


@dataclass
class _History:
    """The conversation so far as block ids: full blocks keep their ids, the open block's
    content is still changing."""

    ids: list[int] = field(default_factory=list)
    open_tokens: int = 0
    tokens: int = 0

    def extend(self, n: int, block: int, new_id: list[int]) -> None:
        self.open_tokens += n
        self.tokens += n
        while self.open_tokens >= block:
            self.ids.append(new_id[0])
            new_id[0] += 1
            self.open_tokens -= block


def conversations(spec: MultiTurnSpec, seed: int) -> list[Conversation]:
    rng = random.Random(f"content-{seed}")
    block = spec.tokens_per_id
    next_id = [0]
    systems: list[_History] = []
    for _ in range(spec.system_prompts):
        h = _History()
        h.extend(rng.randint(*spec.system_tokens), block, next_id)
        systems.append(h)
    out = []
    p_stop = 1.0 / spec.turns_mean
    for _ in range(spec.conversations):
        sys = rng.choice(systems)
        # the system prompt's full blocks are shared; its open block is this conversation's
        h = _History(list(sys.ids), sys.open_tokens, sys.tokens)
        turns: list[Turn] = []
        gaps: list[float] = []
        while len(turns) < spec.turns_max:
            user, reply = rng.randint(*spec.user_tokens), rng.randint(*spec.output_tokens)
            if h.tokens + user + reply > spec.max_prompt_tokens:
                break
            h.extend(user, block, next_id)
            ids = list(h.ids)
            if h.open_tokens:
                ids.append(next_id[0])  # the open block as it reads now: its own id
                next_id[0] += 1
            turns.append(Turn(h.tokens, reply, tuple(ids)))
            h.extend(reply, block, next_id)
            if rng.random() < p_stop:
                break
            gaps.append(spec.think_min_s + rng.expovariate(1.0 / spec.think_s))
        if turns:
            out.append(Conversation(tuple(turns), tuple(gaps[: len(turns) - 1])))
    return out


def schedule(convs: Sequence[Conversation], request_rate: float, seed: int,
             limit: int | None = None) -> list[TraceRequest]:
    """The conversations as a trace arriving at ``request_rate`` per second: conversation
    starts are Poisson at ``request_rate / mean turns``.

    The trace starts in its steady state: conversations begin a burn-in (three mean
    conversation lengths) before time 0 and only turns from time 0 on are kept, so the first
    second has as many turns in flight as any other (their earlier turns were never sent:
    a cluster that starts cold under running traffic). With ``limit``, the first ``limit``
    requests are kept, all before the last conversation start: no ramp-down either."""
    if request_rate <= 0:
        raise ValueError(f"request rate must be positive, got {request_rate}")
    mean_turns = sum(len(c.turns) for c in convs) / len(convs)
    burn_in = 3.0 * sum(sum(c.gaps_s) for c in convs) / len(convs)
    rng = random.Random(f"arrivals-{seed}")
    start, out = -burn_in, []
    for conv in convs:
        t = start
        for i, turn in enumerate(conv.turns):
            if i:
                t += conv.gaps_s[i - 1]
            if t >= 0:
                out.append(TraceRequest(round(t * 1000.0, 3), turn.input_length, turn.output_length, turn.hash_ids))
        start += rng.expovariate(request_rate / mean_turns)
    out.sort(key=lambda r: r.timestamp_ms)
    return out[:limit] if limit is not None else out
