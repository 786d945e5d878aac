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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
                   prefill: int = 2, decode: int = 1, seed: int = 0) -> list[float]:
    """Simulated time to first token of each request, in the order given (seconds)."""
    spec = ClusterSpec(prefill + decode, prefill, decode, per_node=prefill + decode)
    sim = to_sim_requests(requests, cost.chunk_tokens)
    records = SimCluster(spec, cost, policy, seed).run(sim)
    by_id = {r.rid: r.ttft_s for r in records}
    return [by_id[r.rid] for r in sim]
