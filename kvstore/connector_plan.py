"""Scheduler-side planning for the store connector, free of vLLM imports (unit-testable).

For every request the scheduler tracks its chunk keys, its KV block ids and how many leading
chunks are already in the store. Each engine step it turns that into work for the worker:

    load:  chunks [first, hit) of the prompt from the store into the request's blocks
           (first = what the engine's own prefix cache does not already hold)
    save:  every prompt chunk completed by this step that the store does not hold yet

Token -> block: token t lives in block_ids[t // block_size]; a chunk is
``chunk_tokens // block_size`` consecutive blocks.

Tensor parallelism: the plan speaks of rank 0's keys (one scheduler per engine); a chunk is
a hit only when every rank's shard of it is stored (``stored_prefix``), a load carries every
rank's location, and each worker takes its own shard's key and location (``for_rank``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstore.hashing import rank_key
from kvstore.metadata import ChunkLocation


@dataclass(frozen=True)
class LoadItem:
    key: bytes  # the shard to load: rank 0's as planned, a worker's own after ``for_rank``
    loc: ChunkLocation
    block_ids: tuple[int, ...]  # destination blocks, for the chunk's blocks from skip_blocks on
    skip_blocks: int  # leading blocks of the chunk the engine already holds
    rank_locs: tuple[ChunkLocation, ...] = ()  # TP > 1: every rank's shard, by rank

    def for_rank(self, tp_rank: int, tp_size: int) -> LoadItem:
        if tp_rank == 0:
            return self
        return LoadItem(rank_key(self.key, tp_rank, tp_size), self.rank_locs[tp_rank], self.block_ids,
                        self.skip_blocks)


@dataclass(frozen=True)
class SaveItem:
    key: bytes  # rank 0's as planned, a worker's own after ``for_rank``
    block_ids: tuple[int, ...]  # all blocks of the chunk, in order

    def for_rank(self, tp_rank: int, tp_size: int) -> SaveItem:
        return self if tp_rank == 0 else SaveItem(rank_key(self.key, tp_rank, tp_size), self.block_ids)


@dataclass
class StepPlan:
    loads: list[tuple[str, list[LoadItem]]] = field(default_factory=list)
    saves: list[SaveItem] = field(default_factory=list)


@dataclass
class LoadPlan:
    start_token: int  # engine already holds [0, start_token)
    end_token: int  # load up to here (a chunk boundary)
    locs: list[tuple[ChunkLocation, ...]]  # per chunk, every TP rank's shard (by rank)


@dataclass
class RequestState:
    keys: list[bytes]
    n_prompt: int
    block_ids: list[int] = field(default_factory=list)
    stored_chunks: int = 0  # leading chunks known to be in the store (found or saved)


def stored_prefix(found: Sequence[Sequence[ChunkLocation | None]]) -> list[tuple[ChunkLocation, ...]]:
    """The chunks that count as stored, from ``found[rank][chunk]`` (None: not stored): the
    longest prefix in which every rank's shard is stored, as each chunk's locations by rank.
    A chunk missing on one rank is a miss for the engine: its ranks load together or not."""
    hits: list[tuple[ChunkLocation, ...]] = []
    for shards in zip(*found, strict=True):
        if any(loc is None for loc in shards):
            break
        hits.append(tuple(loc for loc in shards if loc is not None))
    return hits


def plan_hit(n_prompt: int, n_stored_chunks: int, chunk_tokens: int) -> int:
    """Prompt tokens to claim from the store: whole chunks, and never the whole prompt
    (the engine must compute at least one token to produce logits)."""
    hit = min(n_stored_chunks, (n_prompt - 1) // chunk_tokens)
    return max(hit, 0) * chunk_tokens


class StepPlanner:
    def __init__(self, chunk_tokens: int, block_size: int, save: bool) -> None:
        if chunk_tokens % block_size:
            raise ValueError(
                f"chunk_tokens ({chunk_tokens}) must be a multiple of the block size ({block_size})"
            )
        self.chunk_tokens = chunk_tokens
        self.block_size = block_size
        self.blocks_per_chunk = chunk_tokens // block_size
        self.save = save

    def load_items(self, state: RequestState, plan: LoadPlan) -> list[LoadItem]:
        c, b = self.chunk_tokens, self.block_size
        items = []
        for chunk in range(plan.start_token // c, plan.end_token // c):
            first = max(chunk * c, plan.start_token)
            ids = state.block_ids[first // b : (chunk + 1) * c // b]
            locs = plan.locs[chunk]
            items.append(LoadItem(state.keys[chunk], locs[0], tuple(ids), (first - chunk * c) // b,
                                  locs if len(locs) > 1 else ()))
        state.stored_chunks = max(state.stored_chunks, plan.end_token // c)
        return items

    def save_items(self, state: RequestState, tokens_done: int) -> list[SaveItem]:
        if not self.save:
            return []
        upto = min(tokens_done, state.n_prompt, len(state.block_ids) * self.block_size)
        upto //= self.chunk_tokens
        per = self.blocks_per_chunk
        items = [
            SaveItem(state.keys[chunk], tuple(state.block_ids[chunk * per : (chunk + 1) * per]))
            for chunk in range(state.stored_chunks, upto)
        ]
        state.stored_chunks = max(state.stored_chunks, upto)
        return items

    def step(
        self,
        req_id: str,
        state: RequestState,
        plan: LoadPlan | None,
        tokens_done: int,
        plan_out: StepPlan,
        seen: set[bytes],
    ) -> None:
        """Add this request's loads and saves for one step to ``plan_out``.

        ``seen`` de-duplicates saves of a chunk shared by several requests in one step.
        """
        if plan is not None and plan.end_token > plan.start_token:
            plan_out.loads.append((req_id, self.load_items(state, plan)))
        for item in self.save_items(state, tokens_done):
            if item.key not in seen:
                seen.add(item.key)
                plan_out.saves.append(item)


def block_ids_after_step(
    current: Sequence[int], new_ids: Sequence[int] | None, resumed: bool
) -> list[int]:
    """vLLM sends only the newly allocated blocks, except for a request resumed from
    preemption, where it sends the whole (new) list."""
    if resumed:
        return list(new_ids or [])
    return list(current) + list(new_ids or [])
