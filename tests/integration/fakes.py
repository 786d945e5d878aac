"""Fake engine replicas for tests whose subject is not the engine (the router's HTTP API,
placement, the dashboard): Serve deployments that answer like the real workers and report
routing stats the way they do."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import ray
import zmq
from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.app import controller_options
from cluster.model import prepare_default_model
from cluster.runtime import free_port
from kvstore.messages import EngineDelta, EngineRequest, ReplicaLoad, scaling_stats
from kvstore.token_channel import InboxAddress, TokenOutbox
from router.app import Router, RouterSpec

MODEL = "tiny"
ACCEPTED_SETTLE_S = 1.0  # how long a cued prefill replica lives on after its work (see FakePrefill)
ZERO = {"num_cpus": 0}  # the fakes must fit beside whatever else runs on a 2-core machine


@contextmanager
def router_with_fakes(namespace: str, spec: dict[str, Any], prefill: tuple[int, tuple[Any, ...]] = (1, ()),
                      decode: tuple[int, tuple[Any, ...]] = (1, ()), router_options: dict[str, Any] | None = None,
                      **ray_init: Any) -> Iterator[str]:
    """A real Ray + Serve with the real router in front of fake engine pools: ``prefill`` and
    ``decode`` are (replicas, constructor args); ``spec`` overrides the RouterSpec defaults
    here. Yields the HTTP base URL; shuts Serve and Ray down after."""
    ray.init(num_cpus=2, namespace=namespace, log_to_driver=False, **ray_init)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    controller_options=controller_options(spec.get("serve_transport", "grpc")))
        full = {"model_dir": str(prepare_default_model()), "served_model_name": MODEL, "max_model_len": 128,
                "default_max_tokens": 8, "max_body_bytes": 64 * 1024, "metrics_export_s": 0,
                "namespace": {"model": "m", "dtype": "float32", "layout": "cpu/bs32", "chunk_tokens": 32}, **spec}
        pools = [serve.deployment(cls, name=role, num_replicas=n, request_router_config=request_router(role),
                                  ray_actor_options=ZERO).bind(*args)
                 for cls, role, (n, args) in ((FakePrefill, "prefill", prefill), (FakeDecode, "decode", decode))]
        router = serve.deployment(Router, name="router", ray_actor_options=ZERO, **(router_options or {}))
        serve.run(router.bind(RouterSpec(**full).__dict__, *pools), name="t")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def die_if_told(fault_dir: str, what: str) -> None:
    """A real replica death on cue: the first replica to find ``<fault_dir>/<what>`` takes it
    (an atomic rename, so exactly one dies) and its process exits on the spot, mid-call."""
    if not fault_dir:
        return
    marker = Path(fault_dir) / what
    try:
        marker.rename(marker.with_suffix(f".taken-{os.getpid()}"))
    except FileNotFoundError:
        return
    os._exit(1)


def request_router(role: str) -> RequestRouterConfig:
    return RequestRouterConfig(request_router_class="router.replica_router:PDRequestRouter",
                               request_router_kwargs={"policy": "kv_aware", "role": role},
                               request_routing_stats_period_s=0.2)


class FakePrefill:
    """Answers one token and publishes what a vLLM engine with a prefix cache would: a
    BlockStored event per 32-token block of the prompt (topic = its Serve tag, as the real
    workers do), so the router's engine-cache index fills through the real feed.

    ``s_per_token`` > 0 makes it an engine with a speed: prompts are computed one at a time
    at that many seconds a token, so prompt work queues up under load (autoscaling tests)."""

    def __init__(self, s_per_token: float = 0.0, fault_dir: str = "") -> None:
        self.tag, self.fault_dir = serve.get_replica_context().replica_tag, fault_dir
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.seq = 0
        self.prompt_tokens = self.busy_s = 0.0  # cumulative, as the real WorkMeter reports
        self.s_per_token, self.engine = s_per_token, asyncio.Lock()
        self.queued_tokens = self.inflight = 0

    async def prefill(self, payload: bytes, routing: bytes | None = None) -> bytes:
        req = EngineRequest.decode(payload)
        assert req.sampling.max_tokens == 1 and routing is not None
        hashes, parent = [], b""
        for i in range(len(req.token_ids) // 32):
            parent = hashlib.sha256(parent + msgpack.packb(req.token_ids[32 * i : 32 * i + 32])).digest()
            hashes.append(parent)
        if hashes:
            event = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None,
                     "token_ids": list(req.token_ids[: 32 * len(hashes)]), "block_size": 32}
            self.sock.send_multipart((self.tag.encode(), self.seq.to_bytes(8, "big"), msgpack.packb([0.0, [event], 0])))
            self.seq += 1
        await self._compute(len(req.token_ids))
        if self.fault_dir and (Path(self.fault_dir) / "kill-prefill").exists():
            # Die only after Serve has told the router it took the call: a replica that dies
            # before that is treated as never reached, and Serve resends the call itself, so
            # the router's own retry (the subject of the fault test) would never run.
            await asyncio.sleep(ACCEPTED_SETTLE_S)
        die_if_told(self.fault_dir, "kill-prefill")  # after the work, before the answer
        return EngineDelta((42,), " Paris", finish_reason="length", num_prompt_tokens=len(req.token_ids),
                           replica=f"prefill-{self.tag}").encode()

    async def _compute(self, n: int) -> None:
        self.queued_tokens += n
        self.inflight += 1
        try:
            async with self.engine:
                t0 = time.monotonic()
                await asyncio.sleep(n * self.s_per_token)
                self.busy_s += max(time.monotonic() - t0, 0.01)
        finally:
            self.queued_tokens -= n
            self.inflight -= 1
        self.prompt_tokens += n

    def record_routing_stats(self) -> dict[str, Any]:
        return {"running": 0, "waiting": 0, "kv_events": f"tcp://127.0.0.1:{self.port}", "busy_s": self.busy_s,
                "prompt_tokens": self.prompt_tokens, "computed_tokens": self.prompt_tokens, "generated_tokens": 0}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return scaling_stats(ReplicaLoad(self.tag, "", inflight=self.inflight, queued_tokens=self.queued_tokens,
                                         computed_tokens=int(self.prompt_tokens), busy_s=self.busy_s))


class FakeDecode:
    """Streams tokens 43, 44, ... after the prompt's last; resumed on a longer input (prompt +
    tokens already sent) it goes on from there, as a greedy engine would. ``s_per_token``
    paces the stream; with ``fault_dir`` it dies mid-stream on cue (``die_if_told``); with
    ``slots`` it runs at most that many sequences at once and queues the rest, as an engine
    with ``max_num_seqs`` does."""

    def __init__(self, s_per_token: float = 0.0, fault_dir: str = "", slots: int = 0) -> None:
        self.generated = self.inflight = 0
        self.s_per_token, self.fault_dir = s_per_token, fault_dir
        self.slots = asyncio.Semaphore(slots) if slots else contextlib.nullcontext()
        self.tag = serve.get_replica_context().replica_tag
        self.outbox = TokenOutbox()

    async def decode_into(self, payload: bytes, inbox: bytes, routing: bytes | None = None) -> int:
        """As the real worker's: the same deltas through the same outbox."""
        return await self.outbox.relay(InboxAddress.decode(inbox), EngineRequest.decode(payload).request_id,
                                       self.decode(payload, routing))

    async def decode(self, payload: bytes, routing: bytes | None = None) -> AsyncIterator[bytes]:
        req = EngineRequest.decode(payload)
        assert 42 in req.token_ids
        done = len(req.token_ids) - 1 - req.token_ids.index(42)  # tokens after the first one already sent
        self.inflight += 1
        try:
            async with self.slots:
                for i in range(req.sampling.max_tokens):
                    if i == 3:
                        die_if_told(self.fault_dir, "kill-decode")
                    last = i == req.sampling.max_tokens - 1
                    self.generated += 1
                    await self._step()
                    yield EngineDelta((43 + done + i,), ".", finish_reason="length" if last else None,
                                      replica=f"fake-d-{self.tag}").encode()
        finally:
            self.inflight -= 1

    async def _step(self) -> None:
        """Until the next step boundary: as in an engine, every running sequence gets its token
        in the same step, so their deltas wake in the same pass of the event loop."""
        if self.s_per_token <= 0:
            await asyncio.sleep(0)
            return
        now = time.monotonic()
        await asyncio.sleep(self.s_per_token - now % self.s_per_token)

    def record_routing_stats(self) -> dict[str, Any]:
        return {"running": self.inflight, "waiting": 0, "generated_tokens": self.generated, "kv_usage": 0.25}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return scaling_stats(ReplicaLoad("fake-d", "", inflight=self.inflight, kv_usage=0.25))
