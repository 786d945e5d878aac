"""The connector's side of the save overlapped with the forward: a step's save begun at its first
``save_kv_layer`` (slots placed, the layers' copies started as the forward finishes them) and
ended in ``wait_for_save`` (hashed and committed, or filled the whole-chunk way, or aborted).

Apart from ``kvstore/connector.py`` so that the connector keeps one concept a method: this
mixin holds the per-step state machine, ``kvstore/gpu_layerwise.py`` the GPU copies. It is
imported on every engine and imports nothing GPU-only (the copies come in on CUDA only)::

    bind_connector_metadata --> (a step left open by a failed forward: its slots aborted)
    first save_kv_layer     --> place the step's slots; LayerwiseSave on them (or None: too
                                small, too scattered: filled after the forward)
    save_kv_layer(l)        --> LayerwiseSave.layer(l); any error: copies cancelled, the step
                                keeps its slots for the whole-chunk path
    wait_for_save           --> every layer seen: finish (hash, wait, seal + commit);
                                else the whole-chunk fill of the same slots; failed step: abort
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvstore.client import ChunkToSave, Placement
from kvstore.connector_plan import SaveItem
from kvstore.logging import get_logger

if TYPE_CHECKING:
    from kvstore.client import StoreClient

log = get_logger(__name__)

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def layerwise_save_enabled() -> bool:
    """The save overlapped with the forward (kvstore/gpu_layerwise.py) on the CUDA path, unless
    PDSERVE_LAYERWISE_SAVE is 0/false/no/off; any other value than those and 1/true/yes/on is
    refused (a typo must not silently pick a path)."""
    raw = os.environ.get("PDSERVE_LAYERWISE_SAVE", "1").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"PDSERVE_LAYERWISE_SAVE={raw!r}: use 1 (save layer by layer, the default) "
                     "or 0 (save after the forward)")


def layerwise_min_bytes() -> int:
    """The smallest step save (bytes) that goes layer by layer: PDSERVE_LAYERWISE_SAVE_MIN_MIB,
    default 64. Below it the step's forward is often host-bound, and the flushes' host time inside
    it (~0.3 ms each, ``gpu_layerwise.FLUSHES`` a step) costs more than the copy they hide:
    measured by bench/gpu/overlap.py (docs/gpu.md, "The save overlapped with the forward");
    0: every step."""
    raw = os.environ.get("PDSERVE_LAYERWISE_SAVE_MIN_MIB", "64").strip()
    if not raw.isdigit():
        raise ValueError(f"PDSERVE_LAYERWISE_SAVE_MIN_MIB={raw!r}: a whole number of MiB (0: every step)")
    return int(raw) << 20


@dataclass
class StepSave:
    """A step's save begun at its first ``save_kv_layer``: its placed slots and, while the
    layers go out group by group, the ``LayerwiseSave`` (None: the whole-chunk path fills the
    placed slots in ``wait_for_save``)."""

    items: list[SaveItem]  # the placed prefix of the step's saves
    placed: Placement
    layers: Any = None  # kvstore.gpu_layerwise.LayerwiseSave


class LayerwiseSteps:
    """Mixin of ``PDStoreConnector`` (worker side): the step's save while the forward runs."""

    # Class defaults: a connector state built without __init__ (tests, benchmarks) saves as before.
    _layerwise: bool = False
    _layerwise_min_bytes: int = 0
    _layer_index: dict[str, int] = {}  # noqa: RUF012  (never mutated: register_kv_caches assigns its own)
    _step: StepSave | None = None
    _step_tried: bool = False
    _store: StoreClient
    _gpu: Any
    _tier: Any
    _warn: Any

    if TYPE_CHECKING:  # the connector's and vLLM's base's (never defined here: the base's must win)
        def _get_connector_metadata(self) -> Any: ...
        def _chunk_nbytes(self) -> int: ...
        def _count(self, name: str, n: int) -> None: ...
        def _staged_into_tier(self, items: Sequence[SaveItem],
                              save: Callable[[Callable[..., None]], Sequence[int | None]]) -> list[int | None]: ...
        def _extract_all(self, items: list[SaveItem], payloads: Sequence[memoryview]) -> list[int | None]: ...

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        """vLLM (0.26 and 0.32 alike: ``maybe_transfer_kv_layer`` around each attention layer)
        calls this once the layer's KV of this step is written. With the layer-wise save, the
        first call of a step places its slots; each queues its layer's part on the side
        stream. Never raises: a failure leaves the step to the whole-chunk path."""
        if not self._layerwise:
            return  # whole chunks are saved after the forward, in wait_for_save
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return  # not one of the caches this connector registered
        try:
            if not self._step_tried:
                self._step_tried = True
                self._begin_step()
            step = self._step
            if step is not None and step.layers is not None:
                step.layers.layer(layer)
        except Exception as e:
            self._layers_failed(e)

    def _begin_step(self) -> None:
        """Place this step's slots and start its layer-wise save (a step too large for one
        staging group, or with scattered slots, fills them after the forward instead)."""
        saves: list[SaveItem] = getattr(self._get_connector_metadata(), "saves", None) or []  # StoreConnectorMetadata's
        if not saves:
            return
        from kvstore.gpu_layerwise import LayerwiseSave, LayerwiseUnavailable
        from kvstore.gpu_path import GROUP_BYTES

        nbytes = self._chunk_nbytes()
        if len(saves) * nbytes < self._layerwise_min_bytes:
            return  # a short step: saved after the forward, as without the layer-wise save
        placed = self._store.place([ChunkToSave(it.key, nbytes) for it in saves])
        self._step = step = StepSave(list(saves[: len(placed.chunks)]), placed)
        if not step.items:
            return
        try:
            step.layers = LayerwiseSave(self._gpu, [it.block_ids for it in step.items], placed.payloads, GROUP_BYTES)
        except LayerwiseUnavailable as e:
            self._count("layerwise_save_fallbacks", 1)
            log.debug("this step is saved after the forward: %s", e)

    def _layers_failed(self, err: BaseException) -> None:
        """A layer's copy (or the placement) failed: the step keeps its slots, if it has them,
        for the whole-chunk path in wait_for_save."""
        step = self._step
        if step is not None and step.layers is not None:
            try:
                step.layers.cancel()
            except Exception:
                pass
            step.layers = None
        self._count("layerwise_save_fallbacks", 1)
        self._warn("layer-wise save", err)

    def _drop_step(self, why: str) -> None:
        """Abort the slots of a step's save that will not be finished (nothing of it is stored)."""
        step, self._step = self._step, None
        if step is None:
            return
        log.warning("%s: %d chunks not saved", why, len(step.items))
        try:
            if step.layers is not None:
                step.layers.cancel()  # no copy may still write a slot once it is given back
            self._store.abort(step.placed)
        except Exception as e:  # the agent reclaims pending slots after its timeout
            self._warn("abort", e)

    def _finish_step(self, step: StepSave) -> int:
        """The end of a save begun during the forward: every layer seen, hash and commit what
        went out layer by layer; otherwise fill the placed slots the whole-chunk way. Any
        failure aborts the slots."""
        try:
            digests: list[int | None]
            if step.layers is not None and step.layers.complete:
                digests = self._finish_layers(step)
                self._count("saved_chunks_layerwise", len(digests))
            else:
                if step.layers is not None:
                    step.layers.cancel()
                    self._count("layerwise_save_fallbacks", 1)
                digests = self._extract_all(step.items, step.placed.payloads)
        except BaseException:
            self._store.abort(step.placed)
            raise
        return self._store.finish(step.placed, digests)

    def _finish_layers(self, step: StepSave) -> list[int | None]:
        """The layer-wise save's checksums; with a device tier, staging's chunks also copied
        into it (``_staged_into_tier``, as the whole-chunk save does)."""
        if self._tier is None:
            return list(step.layers.finish())
        return self._staged_into_tier(step.items, step.layers.finish)
