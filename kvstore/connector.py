"""pdserve's vLLM KV connector: the store as an external prefix cache for vLLM engines.

Loaded by module path (``kv_connector_module_path="kvstore.connector"``,
``kv_connector="PDStoreConnector"``). Two halves, as in every v1 connector:

- scheduler side (EngineCore process): ``get_num_new_matched_tokens`` asks Redis how many
  leading prompt chunks the store holds; ``build_connector_meta`` turns that into per-step
  load and save work (``connector_plan``).
- worker side (the process that owns the paged KV tensors): ``start_load_kv`` copies stored
  chunks into the request's blocks before the forward; ``wait_for_save`` copies every newly
  completed prompt chunk out into the node's segment after it. On CUDA (TP=1) the save is
  overlapped with the forward instead: the step's slots are placed at its first
  ``save_kv_layer``, each layer's part is gathered and copied out as the forward finishes it
  (``kvstore/gpu_layerwise.py``), and ``wait_for_save`` only hashes, waits and commits;
  ``PDSERVE_LAYERWISE_SAVE=0`` turns it off.
- tensor parallelism: one scheduler side per engine, one worker side per rank. Each rank's
  shard of a chunk is its own slot under its own key (``hashing.rank_key``); the scheduler
  counts a chunk only when every rank's shard is stored, and each worker takes its own
  shard's key and location from the step's plan (``bind_connector_metadata``).

Contract with vLLM: nothing on the KV path may fail a request or produce a wrong token. Any
error (Redis down, agent gone, slot evicted or corrupt) makes a lookup a miss, a load a set
of failed blocks (vLLM recomputes them: ``kv_load_failure_policy="recompute"``), or a save
a no-op. No exception ever escapes into the engine.

Bytes of one chunk in a slot (blocks moved whole; a block's inner layout is the engine's):

    [layer 0: block 0 | block 1 | ...][layer 1: block 0 | ...] ... [layer L-1: ...]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvstore.client import ChunkToSave, StoreClient
from kvstore.connector_plan import (
    LoadItem,
    LoadPlan,
    RequestState,
    SaveItem,
    StepPlan,
    StepPlanner,
    block_ids_after_step,
    plan_hit,
    stored_prefix,
)
from kvstore.gpu_step import (
    LayerwiseSteps,
    StepSave,
    layerwise_min_bytes,
    layerwise_save_enabled,
)
from kvstore.hashing import KVNamespace, chunk_keys, rank_keys
from kvstore.logging import get_logger

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from kvstore.metadata import ChunkLocation

log = get_logger(__name__)


def gpu_path_enabled() -> bool:
    """The CUDA KV path (kvstore/gpu_path.py: pinned segment, a request's chunks gathered,
    hashed and scattered in one step, checksums on the GPU) unless PDSERVE_GPU_KV_PATH=0."""
    return os.environ.get("PDSERVE_GPU_KV_PATH", "1") != "0"


def _worker_tp_rank() -> int | None:
    """This worker's tensor-parallel rank, from vLLM's TP group (set up before any connector is
    built: ``init_device`` precedes ``initialize_from_config`` in vLLM 0.26 and 0.32); None
    when it cannot be had: that worker then never saves and fails every load (recompute)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception as e:
        log.warning("no tensor-parallel rank (%s: %s); this worker recomputes", type(e).__name__, e)
        return None


@dataclass
class StoreConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[tuple[str, list[LoadItem]]] = field(default_factory=list)
    saves: list[SaveItem] = field(default_factory=list)

    def for_rank(self, tp_rank: int, tp_size: int) -> StoreConnectorMetadata:
        """This step's work for TP rank ``tp_rank``: its own shards' keys and locations."""
        if tp_rank == 0:
            return self
        return StoreConnectorMetadata(
            loads=[(rid, [it.for_rank(tp_rank, tp_size) for it in items]) for rid, items in self.loads],
            saves=[it.for_rank(tp_rank, tp_size) for it in self.saves],
        )


@dataclass(frozen=True)
class ConnectorSettings:
    """Parsed from ``kv_connector_extra_config`` (written by the control plane)."""

    redis_url: str
    prefix: str
    node_id: str
    instance: str
    namespace: KVNamespace
    transport: str = "tcp"  # for chunks on other nodes; same-node chunks map the segment
    tls: dict[str, str] | None = None  # kvstore.peer_auth.TlsFiles fields, for the grpc transport
    gpu_tier_mb: int = 0  # CUDA engines: a device tier of this size per saving worker; 0 = off
    replicate_after: int = 0  # pulls from other nodes that give a chunk a replica on this one; 0 = off

    @classmethod
    def parse(cls, extra: dict[str, Any], vllm_config: VllmConfig) -> ConnectorSettings:
        missing = [k for k in ("redis_url", "node_id") if not extra.get(k)]
        if missing:
            raise ValueError(f"kv_connector_extra_config lacks {missing}")
        block_size = vllm_config.cache_config.block_size
        ns = dict(extra.get("namespace") or {})
        ns.setdefault("model", vllm_config.model_config.model)
        ns.setdefault("dtype", str(vllm_config.model_config.dtype).removeprefix("torch."))
        ns.setdefault("layout", f"{vllm_config.device_config.device_type}/bs{block_size}")
        ns.setdefault("chunk_tokens", block_size)
        return cls(
            redis_url=str(extra["redis_url"]),
            prefix=str(extra.get("prefix", "pdkv")),
            node_id=str(extra["node_id"]),
            instance=str(extra.get("instance", "engine")),
            namespace=KVNamespace(**ns),
            transport=str(extra.get("transport", "tcp")),
            tls=dict(extra["tls"]) if extra.get("tls") else None,
            gpu_tier_mb=int(extra.get("gpu_tier_mb") or 0),
            replicate_after=int(extra.get("replicate_after") or 0),
        )


class _Warner:
    """Log the first failure of a kind, then every 100th, and the recovery: a dead Redis
    must not flood the logs, but an operator must see both when it broke and when it healed."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, what: str, err: BaseException) -> None:
        n = self.counts.get(what, 0)
        self.counts[what] = n + 1
        if n % 100 == 0:
            log.warning("kv store %s failed (%d in a row), recomputing: %s: %s",
                        what, n + 1, type(err).__name__, err)

    def ok(self, what: str) -> None:
        n = self.counts.pop(what, 0)
        if n:
            log.warning("kv store %s works again after %d failures", what, n)


class PDStoreConnector(LayerwiseSteps, KVConnectorBase_V1):  # type: ignore[misc]
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        xfer = self._kv_transfer_config
        self.settings = ConnectorSettings.parse(dict(xfer.kv_connector_extra_config), vllm_config)
        self._block_size = vllm_config.cache_config.block_size
        self._load_enabled = bool(xfer.is_kv_consumer)
        self._save_enabled = bool(xfer.is_kv_producer)
        self._num_blocks = kv_cache_config.num_blocks
        self._enabled = len(kv_cache_config.kv_cache_groups) <= 1
        if not self._enabled:
            log.warning("models with several KV cache groups are not stored; always recompute")
        # Tensor parallelism: each rank holds its own shard of every block (its KV heads) and
        # stores it as its own chunk under its own key (kvstore.hashing.rank_key). The
        # scheduler plans with rank 0's keys and counts a chunk only when every rank's shard
        # is stored; each worker swaps in its own keys (bind_connector_metadata).
        parallel = vllm_config.parallel_config
        self._tp_size: int = parallel.tensor_parallel_size
        self._tp_rank: int | None = 0  # None: a worker that could not learn its rank
        if self._tp_size > 1 and role == KVConnectorRole.WORKER:
            self._tp_rank = _worker_tp_rank()
        # Pipeline stages hold other layers and decode context parallelism splits a block's
        # tokens across ranks; neither is in the keys, so such engines always recompute.
        if parallel.pipeline_parallel_size > 1 or getattr(parallel, "decode_context_parallel_size", 1) > 1:
            self._enabled = False
            log.warning("pipeline / decode-context-parallel engines do not use the store; always recompute")
        s = self.settings
        self._store = StoreClient(s.redis_url, s.prefix, s.node_id, transport=s.transport, tls=s.tls,
                                  replicate_after=s.replicate_after)
        self._warn = _Warner()
        # scheduler side
        self._planner = StepPlanner(s.namespace.chunk_tokens, self._block_size, self._save_enabled)
        self._reqs: dict[str, RequestState] = {}
        self._pending_loads: dict[str, LoadPlan] = {}
        # worker side: per layer, a [num_blocks, ...] view whose rows are whole blocks
        self._blocks: list[torch.Tensor] = []
        self._gpu: Any = None  # kvstore.gpu_path.GpuKVPath when the cache is on CUDA
        self._tier: Any = None  # kvstore.transport.cuda_ipc.DeviceTier: this worker saves into one
        self._tier_reader: Any = None  # ...TierReader: this worker loads from the node's device tiers
        self._tier_warned: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._layer_index: dict[str, int] = {}  # layer name -> its index in _blocks
        self._layerwise = False  # save_kv_layer writes the step's chunks (CUDA, TP=1, the switch on)
        self._layerwise_min_bytes = 0  # steps saving less go after the forward (layerwise_min_bytes)
        self._step: StepSave | None = None  # this step's save, once its first layer came
        self._step_tried = False  # this step's save was begun (or could not be): once per step
        self._counters: dict[str, int] = {}
        # The process that started this one (the engine core, or the replica): once it is
        # gone, this process is being torn down and publishes nothing more.
        self._parent_pid = os.getppid()

    # ===================================================================== scheduler side

    def _state(self, req_id: str, prompt: list[int]) -> RequestState:
        state = self._reqs.get(req_id)
        if state is None:
            keys = chunk_keys(self.settings.namespace, prompt)
            state = self._reqs[req_id] = RequestState(keys=keys, n_prompt=len(prompt))
        return state

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        state = self._state(request.request_id, list(request.prompt_token_ids or []))
        self._pending_loads.pop(request.request_id, None)
        if not (self._enabled and self._load_enabled and state.keys):
            return 0, False
        try:
            locs = self._lookup_all_ranks(state.keys)
        except Exception as e:
            self._warn("lookup", e)
            self._count("lookup_failures", 1)
            return 0, False
        self._warn.ok("lookup")
        self._count("lookup_hit_chunks", len(locs))
        self._count("lookup_miss_chunks", len(state.keys) - len(locs))
        state.stored_chunks = max(state.stored_chunks, len(locs))
        hit = plan_hit(state.n_prompt, len(locs), self.settings.namespace.chunk_tokens)
        if hit <= num_computed_tokens:
            return 0, False
        self._pending_loads[request.request_id] = LoadPlan(num_computed_tokens, hit, locs)
        return hit - num_computed_tokens, False

    def _lookup_all_ranks(self, keys: list[bytes]) -> list[tuple[ChunkLocation, ...]]:
        """The stored prefix of a prompt, per chunk every TP rank's shard location: one Redis
        round trip over all ranks' keys (TP=1: exactly today's keys and lookup)."""
        per_rank = rank_keys(keys, self._tp_size)
        found = self._store.lookup([k for ks in per_rank for k in ks])
        n = len(keys)
        return stored_prefix([found[r * n : (r + 1) * n] for r in range(self._tp_size)])

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens == 0:
            self._pending_loads.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        out = StepPlan()
        seen: set[bytes] = set()
        num_scheduled = scheduler_output.num_scheduled_tokens
        if self._enabled:
            for new in scheduler_output.scheduled_new_reqs:
                state = self._state(new.req_id, list(new.prompt_token_ids or []))
                state.block_ids = list(new.block_ids[0])
                done = new.num_computed_tokens + num_scheduled.get(new.req_id, 0)
                plan = self._pending_loads.pop(new.req_id, None)
                self._planner.step(new.req_id, state, plan, done, out, seen)
            cached = scheduler_output.scheduled_cached_reqs
            for i, req_id in enumerate(cached.req_ids):
                state = self._reqs.get(req_id)
                if state is None:
                    continue
                new_ids = cached.new_block_ids[i]
                state.block_ids = block_ids_after_step(
                    state.block_ids, new_ids[0] if new_ids else None, req_id in cached.resumed_req_ids
                )
                done = cached.num_computed_tokens[i] + num_scheduled.get(req_id, 0)
                plan = self._pending_loads.pop(req_id, None)
                self._planner.step(req_id, state, plan, done, out, seen)
        for req_id in scheduler_output.finished_req_ids:
            self._reqs.pop(req_id, None)
        self._pending_loads.clear()
        self._flush_counters()  # this step's lookups, in one round trip
        return StoreConnectorMetadata(loads=out.loads, saves=out.saves)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    # ======================================================================== worker side

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Each step, before the forward: take this TP rank's share of the step's work."""
        meta = connector_metadata
        if isinstance(meta, StoreConnectorMetadata) and self._tp_size > 1:
            if self._tp_rank is None:  # no key of ours to save under or load from: recompute
                for _req_id, items in meta.loads:
                    for it in items:
                        self._failed_blocks.update(it.block_ids)
                meta = StoreConnectorMetadata()
            else:
                meta = meta.for_rank(self._tp_rank, self._tp_size)
        self._drop_step("a step's save was begun but never waited for (its forward failed)")
        self._step_tried = False
        super().bind_connector_metadata(meta)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._blocks = [self._block_rows(t) for t in kv_caches.values()]
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        if self._blocks and self._blocks[0].is_cuda and gpu_path_enabled():
            from kvstore.gpu_path import GpuKVPath  # CUDA only: never imported on CPU engines

            self._gpu = GpuKVPath(self._blocks)
            self._start_device_tier()
            # Layer by layer needs this rank's slots on this node and GPU checksums; TP ranks
            # keep the whole-chunk path (one rank's forward is not the others').
            self._layerwise = (layerwise_save_enabled() and self._enabled and self._save_enabled
                               and self._tp_size == 1 and bool(self._gpu.gpu_checksums))
            self._layerwise_min_bytes = layerwise_min_bytes()
            log.info("save overlapped with the forward (layer by layer): %s, for steps saving %d MiB or more",
                     self._layerwise, self._layerwise_min_bytes >> 20)

    def _start_device_tier(self) -> None:
        """The device tier (``kvstore.gpu_tier_mb`` > 0, GPU checksums working): a worker that
        saves keeps its chunks' copies in a GPU buffer of its own; one that loads pulls the
        node's copies from there. Any failure leaves the host path alone, as without a tier."""
        s = self.settings
        if s.gpu_tier_mb <= 0 or not self._enabled or not self._gpu.gpu_checksums:
            return
        from kvstore.transport.cuda_ipc import DeviceTier, TierReader, ipc_opener  # CUDA engines only

        try:
            if self._save_enabled:
                self._tier = DeviceTier.allocate(self._store.meta, s.node_id, self._gpu.device, self._chunk_nbytes(),
                                                 s.gpu_tier_mb << 20)
            if self._load_enabled:
                self._tier_reader = TierReader(self._store.meta, s.node_id, ipc_opener(self._gpu.device), self._tier)
        except Exception as e:
            log.warning("no device tier (%s: %s): KV goes through the host segment only", type(e).__name__, e)
            self._tier = self._tier_reader = None

    def _block_rows(self, cache: torch.Tensor) -> torch.Tensor:
        """A view of one layer's cache as [num_blocks, ...]: row b is all of block b's bytes,
        whatever the attention backend's layout ([blocks, ...] on CPU, [2, blocks, ...] for
        split K/V layouts). A permuted view is taken in memory order: CUDA FlashAttention
        (vLLM 0.26) hands over logical [blocks, heads, tokens, 2*head] over NHD memory
        [blocks, tokens, heads, 2*head], so a block's bytes are still one contiguous run."""
        n = self._num_blocks
        if not cache.is_contiguous():
            strides = cache.stride()
            cache = cache.permute(*sorted(range(cache.dim()), key=lambda d: -strides[d]))
        for dim, size in enumerate(cache.shape):
            if size % n == 0 and size >= n:
                return cache.view(*cache.shape[:dim], n, -1).movedim(dim, 0)
        raise ValueError(f"no block dimension of size {n} in KV cache of shape {tuple(cache.shape)}")

    def _chunk_view(self, payload: memoryview, n_blocks: int) -> torch.Tensor:
        ref = self._blocks[0]
        flat = torch.frombuffer(payload, dtype=ref.dtype)
        return flat.view(len(self._blocks), n_blocks, *ref.shape[1:])

    def _chunk_nbytes(self) -> int:
        ref = self._blocks[0]
        per_block = ref[0].numel() * ref.element_size()
        return len(self._blocks) * self._planner.blocks_per_chunk * per_block

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, StoreConnectorMetadata) or not meta.loads:
            return
        for _req_id, items in meta.loads:
            try:
                ok = self._load(items)
            except Exception as e:  # the engine copy itself failed: recompute all of it
                self._warn("load", e)
                ok = [False] * len(items)
            # A request's KV must be a prefix: from the first missing chunk on, recompute.
            first_bad = ok.index(False) if False in ok else len(items)
            for rest in items[first_bad:]:
                self._failed_blocks.update(rest.block_ids)
            self._count("loaded_chunks", first_bad)
            self._count("load_failures", len(items) - first_bad)
            if first_bad < len(items):
                self._warn("load", RuntimeError(f"{len(items) - first_bad} of {len(items)} chunks unavailable"))
            else:
                self._warn.ok("load")
        self._flush_counters()

    def _load(self, items: list[LoadItem]) -> list[bool]:
        """Copy a request's stored chunks into its blocks; per chunk, whether it arrived.

        With a device tier, the chunks it holds on this node come first, straight from their
        owner's GPU and verified on this one (``_load_from_tier``); the rest, and any that
        failed there, take the store path: the CUDA path copies all of the request's slots on
        this node to the GPU at once and verifies its own copies there (the host never hashes
        them); chunks from other nodes, and every chunk of other engines, come as the client's
        verified payloads."""
        ok = [False] * len(items)
        if self._tier_reader is not None:
            ok = self._load_from_tier(items)
        rest = [i for i, got in enumerate(ok) if not got]
        todo = [items[i] for i in rest]
        if not todo:
            return ok
        keys, locs = [it.key for it in todo], [it.loc for it in todo]
        gpu = self._gpu

        def inject(j: int, payload: memoryview) -> None:  # a payload the client verified
            self._inject(payload, todo[j])

        if gpu is not None and gpu.gpu_checksums:
            per = self._planner.blocks_per_chunk

            def check(idx: Sequence[int], payloads: Sequence[memoryview], digests: Sequence[int]) -> list[bool]:
                targets = [(todo[j].block_ids, todo[j].skip_blocks) for j in idx]
                return [bool(m) for m in gpu.load_many(payloads, digests, targets, per)]

            got = self._store.batch_get_self_verified(keys, locs, check, inject)
        else:
            got = self._store.batch_get(keys, locs, inject)
        for i, delivered in zip(rest, got, strict=True):
            ok[i] = delivered
        return ok

    def _load_from_tier(self, items: list[LoadItem]) -> list[bool]:
        """Per chunk, whether it came from a device tier. ``device_tier_fallbacks`` counts the
        chunks that had a copy worth a pull there but did not come (owner gone, handle not
        opening, slot reused: checksum differs); they go to the store path like the rest."""
        ok = [False] * len(items)
        try:
            found = self._tier_reader.sources([it.key for it in items], [it.loc for it in items],
                                              self._chunk_nbytes())
            matched = self._gpu.load_from_device(
                found.srcs, [items[i].loc.checksum for i in found.idx],
                [(items[i].block_ids, items[i].skip_blocks) for i in found.idx], self._planner.blocks_per_chunk)
        except Exception as e:
            self._tier_failed("read", e)
            return ok
        for i, m in zip(found.idx, matched, strict=True):
            ok[i] = bool(m)
        self._count("loaded_chunks_device", sum(ok))
        self._count("device_tier_fallbacks", found.failed + len(found.idx) - sum(ok))
        return ok

    def _tier_failed(self, what: str, err: BaseException) -> None:
        """A device tier call failed: counted; logged once per kind (the host path carries on)."""
        self._count("device_tier_errors", 1)
        if what not in self._tier_warned:
            self._tier_warned.add(what)
            log.warning("device tier %s failed, the host path carries on: %s: %s", what, type(err).__name__, err)

    def _inject(self, payload: memoryview, item: LoadItem) -> None:
        per = self._planner.blocks_per_chunk
        if len(payload) != self._chunk_nbytes():
            raise ValueError(f"chunk holds {len(payload)} B, this engine expects {self._chunk_nbytes()}")
        if self._gpu is not None:
            self._gpu.inject(payload, item.block_ids, per, item.skip_blocks)
            return
        src = self._chunk_view(payload, per)
        ids = torch.tensor(item.block_ids, device=self._blocks[0].device)
        for layer, rows in enumerate(self._blocks):
            rows.index_copy_(0, ids, src[layer, item.skip_blocks :].to(rows.device))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def orphaned(self) -> bool:
        """True once the process that started this one (engine core or replica) has died."""
        return os.getppid() != self._parent_pid

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, StoreConnectorMetadata) or not meta.saves:
            self._drop_step("a save begun without this step's plan")  # cannot be; never leak slots
            return
        # vLLM calls this from a `finally`: also after a forward that raised (an engine torn
        # down mid-step when its replica is killed). Its blocks then hold KV that was never
        # computed; saved, it would pass every checksum and serve garbage to the next reader
        # (seen: a killed replica's retry answered EOS). Only a step that completed saves;
        # the slots a layer-wise save placed for it are given back.
        failed = sys.exc_info()[1]
        if failed is not None or self.orphaned():
            why = f"the step failed ({type(failed).__name__})" if failed else f"process {self._parent_pid} is gone"
            self._drop_step(why)
            self._warn("save", RuntimeError(f"{why}: its chunks are not saved"))
            self._count("save_failures", len(meta.saves))
            return
        step, self._step = self._step, None
        nbytes = self._chunk_nbytes()
        items = meta.saves
        try:
            if step is None:
                stored = self._store.batch_put_all(
                    [ChunkToSave(it.key, nbytes) for it in items],
                    lambda payloads: self._extract_all(items, payloads),
                )
            else:
                stored = self._finish_step(step)
            self._warn.ok("save")
            self._count("saved_chunks", stored)
        except Exception as e:
            self._warn("save", e)
            self._count("save_failures", len(items))
        self._flush_counters()

    def _extract_all(self, items: list[SaveItem], payloads: Sequence[memoryview]) -> list[int | None]:
        """Write each chunk's blocks into its payload (the store placed the first
        ``len(payloads)`` of ``items``); per chunk, its checksum or None, as ``_extract``.
        The CUDA path does all of them at once (one gather, one hash, one wait)."""
        if self._gpu is not None:
            placed = items[: len(payloads)]
            if self._tier is not None:
                return self._extract_to_tier(placed, payloads)
            return self._gpu.extract_many([it.block_ids for it in placed], payloads)  # type: ignore[no-any-return]
        return [self._extract(it, p) for it, p in zip(items, payloads, strict=False)]

    def _extract_to_tier(self, items: list[SaveItem], payloads: Sequence[memoryview]) -> list[int | None]:
        """``extract_many``, each staging group also copied into the device tier."""
        return self._staged_into_tier(
            items, lambda stage: self._gpu.extract_many_staged([it.block_ids for it in items], payloads, stage))

    def _staged_into_tier(self, items: Sequence[SaveItem],
                          save: Callable[[Callable[..., None]], Sequence[int | None]]) -> list[int | None]:
        """Run a CUDA save whose staging groups ``save(tier.stage)`` also copies into the
        device tier, then write the tier's mappings: a failure there costs the tier copy, never
        the save (the whole-chunk save and the layer-wise one, ``gpu_step``, both end here)."""
        tier = self._tier
        try:
            digests: list[int | None] = list(save(tier.stage))
        except BaseException:
            tier.abandon()
            raise
        try:
            self._count("saved_chunks_device", tier.publish([it.key for it in items], digests))
        except Exception as e:
            tier.abandon()
            self._tier_failed("save", e)
        return digests

    def _extract(self, item: SaveItem, payload: memoryview) -> int | None:
        """Write the chunk's blocks into ``payload``; returns its checksum when the copy took
        it (the CUDA path hashes on the GPU), else None (the client hashes the slot)."""
        if self._gpu is not None:
            return self._gpu.extract(item.block_ids, payload)  # type: ignore[no-any-return]
        dst = self._chunk_view(payload, len(item.block_ids))
        ids = torch.tensor(item.block_ids, device=self._blocks[0].device)
        for layer, rows in enumerate(self._blocks):
            if rows.device.type == "cpu":
                torch.index_select(rows, 0, ids, out=dst[layer])
            else:
                dst[layer].copy_(rows.index_select(0, ids))
        return None

    def get_block_ids_with_load_errors(self) -> set[int]:
        # Tensor parallelism: every rank reports its own failed blocks, and vLLM's executor
        # merges them with a union (KVOutputAggregator.aggregate: ``invalid_block_ids |=``,
        # 0.26 and 0.32, mp and Ray executors) before the scheduler sees them. Block ids are
        # the scheduler's, the same on every rank, so a chunk that failed on any one rank is
        # recomputed on all of them: no rank runs on another's or a stale shard.
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # ====================================================================== stats / admin

    def _count(self, name: str, n: int) -> None:
        if n:
            self._counters[name] = self._counters.get(name, 0) + n

    def _flush_counters(self) -> None:
        for name, n in self._store.drain_counters().items():
            self._count(name, n)
        if not self._counters:
            return
        counters, self._counters = self._counters, {}
        try:
            self._store.meta.add_counters(self.settings.instance, counters, time.time())
            self._warn.ok("stats")
        except Exception as e:
            self._warn("stats", e)

    def shutdown(self) -> None:
        self._drop_step("shut down mid-step")
        if self._tier is not None:
            try:
                self._tier.close()  # readers stop pulling from it
            except Exception as e:
                log.warning("device tier close: %s: %s", type(e).__name__, e)
        if self._tier_reader is not None:
            self._tier_reader.close()
        if self._gpu is not None:
            self._gpu.close()
        self._store.close()
