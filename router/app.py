"""The router: a Serve ingress with the OpenAI HTTP API.

Per request: validate the body, tokenize once (chat template applied), compute the prompt's
chunk keys, get the first token from a prefill replica, send it to the client, then stream
the rest from a decode replica (``router.pipeline``). Errors are typed inside and turned into
OpenAI-style JSON here, at the edge; nothing a client sends can take the process down.

Faults: an engine call's failure is read once (``router.faults``): a lost replica is retried
or resumed by the pipeline, a full pool is a 429. Past ``max_inflight_requests`` the router
answers 429 at once (``router.admission``); a request past ``request_timeout_s`` is stopped
and its engine calls cancelled; a client that goes away has its engine calls cancelled too
(Serve cancels the handler; the streams here cancel their engine generators), so the
engines abort the request and free its KV.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import get_node_ip_address
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvstore.hashing import KVNamespace, chunk_keys
from kvstore.logging import get_logger
from kvstore.messages import EngineDelta, EngineRequest, SamplingSpec
from kvstore.metadata import MetadataStore, connect
from kvstore.peer_auth import PeerAuth
from kvstore.stats import StoreStats, collect, render_prometheus
from kvstore.token_channel import TokenInbox
from router.admission import Admission
from router.auth import ApiKeys
from router.errors import APIError, BadRequest, NotFound, Overloaded, PayloadTooLarge, Unavailable, Unprocessable
from router.faults import ReplicaLost, translate
from router.index import EngineEventFeed, StoreIndexFeed
from router.live import CounterRates, RequestLog, snapshot
from router.metrics import render_pools, render_requests
from router.openai_format import ResponseBuilder
from router.openapi import openapi_schema
from router.pipeline import Generation, Retries, Trace, first_token, rest
from router.policy import RoutingRequest, RoutingState
from router.policy import state as routing_state
from router.protocol import ChatCompletionRequest, CompletionRequest, parse
from router.ray_export import ExportLoop
from router.tokenizer import PromptTokenizer

log = get_logger(__name__)
DASHBOARD_HTML = (Path(__file__).parent / "dashboard.html").read_text()


@dataclass(frozen=True)
class RouterSpec:
    model_dir: str
    served_model_name: str
    max_model_len: int
    default_max_tokens: int
    max_body_bytes: int
    namespace: dict[str, Any]
    redis_url: str = ""  # the store's metadata, for /metrics ("" = no store metrics)
    store_prefix: str = "pdkv"
    store_tls: dict[str, str] | None = None  # kvstore.peer_auth.TlsFiles fields, to reach the agents
    prefill_prior_tps: float = 350.0  # prefill tokens/s assumed until a replica's rate is measured
    router_replicas: int = 1
    metrics_export_s: float = 5.0  # how often pdserve's metrics go out through Ray's export; 0 = never
    api_key_digests: list[str] = field(default_factory=list)  # SHA-256 of the accepted keys; none = open
    max_inflight_requests: int = 512  # per router replica; past it, 429 with Retry-After
    retry_after_s: float = 1.0
    request_timeout_s: float = 600.0  # from the request's arrival to its last token; 0 = none
    prefill_attempts: int = 3
    decode_resumes: int = 3
    decode_stream: str = "channel"  # how decoded tokens reach the router: "channel" | "serve" (router config)
    serve_transport: str = "grpc"  # how the engine calls travel: "grpc" (Serve's gRPC) | "ray" (Ray actor calls)


GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
SERVE_TRANSPORTS = ("grpc", "ray")  # router.serve_transport's values (cluster/config.py spells them for pydantic)


def over_transport(handle: DeploymentHandle, transport: str) -> DeploymentHandle:
    """``handle`` with its calls on Serve's inter-deployment gRPC (``"grpc"``: every replica
    runs that server; arguments go by value, which suits the engine calls: token ids and keys,
    the KV goes through the store) or as Ray actor calls (``"ray"``: by reference). Said per
    handle, so it holds however the process's Serve defaults were set."""
    if transport not in SERVE_TRANSPORTS:
        raise ValueError(f"serve_transport must be 'grpc' or 'ray', not {transport!r}")
    return handle.options(_by_reference=transport == "ray")


app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
app.state.api_keys = ApiKeys()  # the Router of this replica process sets its own
app.state.admission = Admission(1 << 30)  # likewise


class _AdmissionMiddleware:
    """Holds an admission slot for the whole ASGI call of a generate request: until its last
    byte is sent or the call is cancelled (a streamed body outlives its handler, so this
    cannot be done inside the endpoint)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATE_PATHS:
            return await self.inner(scope, receive, send)
        state = scope["app"].state  # the app Serve runs (it serves a copy of the module's `app`)
        admission: Admission = state.admission
        try:
            admission.admit()
        except Overloaded as e:
            router = getattr(state, "router", None)
            if router is not None:
                router.requests.fault("rejected")
            await JSONResponse(e.body(), status_code=e.status, headers=e.headers())(scope, receive, send)
            return None
        try:
            return await self.inner(scope, receive, send)
        finally:
            admission.release()


app.add_middleware(_AdmissionMiddleware)
app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]


class _ApiKeyMiddleware:
    """Bearer keys on /v1 and /debug (``router.auth``), before admission. Plain ASGI, not
    ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware passes every chunk of a
    streamed body through a memory stream between two tasks, per token."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            keys: ApiKeys = scope["app"].state.api_keys
            if keys.guards(scope["path"]):
                try:
                    keys.check(Headers(scope=scope).get("authorization"))
                except APIError as e:
                    response = JSONResponse(e.body(), status_code=e.status, headers={"WWW-Authenticate": "Bearer"})
                    return await response(scope, receive, send)
        return await self.inner(scope, receive, send)


app.add_middleware(_ApiKeyMiddleware)  # added last: runs first


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


@app.exception_handler(RequestValidationError)
async def _params_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """A query or path parameter FastAPI validates (e.g. ``/debug/routes?last=x``)."""
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    err = Unprocessable(f"{param}: {first.get('msg', 'invalid')}" if param else "invalid parameters", param=param)
    return JSONResponse(err.body(), status_code=err.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = NotFound(str(exc.detail)) if exc.status_code == 404 else BadRequest(str(exc.detail))
    return JSONResponse(err.body(), status_code=exc.status_code)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in the router")
    return JSONResponse(APIError(f"internal error: {type(exc).__name__}").body(), status_code=500)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _before(deadline: float | None, items: AsyncIterator[EngineDelta]) -> AsyncIterator[EngineDelta]:
    """``items`` until ``deadline`` (event-loop time), then TimeoutError. Only the wait for
    the next item is timed: a timeout never lands while the caller holds an item."""
    it = aiter(items)
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                item = await anext(it)
        except StopAsyncIteration:
            return
        yield item


@serve.ingress(app)
class Router:
    def __init__(self, spec: dict[str, Any], prefill: DeploymentHandle, decode: DeploymentHandle) -> None:
        self.spec = RouterSpec(**spec)
        app.state.api_keys = ApiKeys(self.spec.api_key_digests)
        app.state.admission = Admission(self.spec.max_inflight_requests, self.spec.retry_after_s)
        app.state.router = self
        self.retries = Retries(self.spec.prefill_attempts, self.spec.decode_resumes)
        self.tokenizer = PromptTokenizer(self.spec.model_dir)
        self.namespace = KVNamespace(**self.spec.namespace)
        prefill, decode = (over_transport(h, self.spec.serve_transport) for h in (prefill, decode))
        self._prefill = prefill
        self._decode = decode
        self._decode_streamed = decode.options(stream=True)
        self._inbox: TokenInbox | None = None  # the decode replicas' tokens (channel mode); bound at first use
        self._created = int(time.time())
        # What the routing policy reads: which store nodes hold which chunks and which
        # chunks each prefill engine's own cache holds (kept current off the request path by
        # two feed threads), measured rates and transfer costs. The pools' request routers
        # live in this process and pick it up (router/policy/state).
        self.routing = RoutingState(self.namespace.chunk_tokens, self.spec.prefill_prior_tps,
                                    shared_routers=self.spec.router_replicas > 1)
        self.routing.engine_feed = EngineEventFeed(self.routing.engines, self.namespace)
        self.routing.engine_feed.start()
        routing_state.install(self.routing)
        self.requests = RequestLog()  # for the dashboard: latencies of what this replica served
        self._rates = CounterRates()
        self._store_stats_at: tuple[float, StoreStats | None] = (float("-inf"), None)
        self._store_stats_lock = threading.Lock()
        # How this router proves itself to the store agents when it asks for their stats.
        self._store_auth = PeerAuth.for_store(self.spec.redis_url, self.spec.store_prefix, self.spec.store_tls)
        self._index_feed: StoreIndexFeed | None = None
        if self.spec.redis_url:
            url, prefix = self.spec.redis_url, self.spec.store_prefix
            # The feed blocks on XREAD for up to a second: its socket timeout must be longer.
            self._index_feed = StoreIndexFeed(
                self.routing.store, lambda: MetadataStore(connect(url, timeout_s=5.0), prefix), block_ms=1000,
                on_tick=lambda meta: self.routing.costs.update(meta.stats(), self.namespace.chunk_tokens),
            )
            self._index_feed.start()
        self._export: ExportLoop | None = None
        if self.spec.metrics_export_s > 0:
            ctx = serve.get_replica_context()
            whole_cluster = ctx.rank is None or ctx.rank.rank == 0  # one replica speaks for the store and pools
            rates = CounterRates()  # its own: the dashboard's rates must not see the export's reads
            self._export = ExportLoop(lambda: self._export_text(whole_cluster, rates),
                                      self.spec.metrics_export_s).start()

    # -- endpoints ------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus text: the KV store's metrics, then this router's (its pools' replicas
        and the requests it served: router/metrics.py). vLLM's and Serve's own go through
        Ray's metrics export."""
        return PlainTextResponse(self._metrics_text(await self._store_stats(), self._rates),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/dashboard")
    async def dashboard(self) -> HTMLResponse:
        """A live page of the pools, the store and recent latencies (polls /dashboard/data)."""
        return HTMLResponse(DASHBOARD_HTML)

    @app.get("/dashboard/data")
    async def dashboard_data(self) -> JSONResponse:
        """The dashboard's numbers (and ``pdserve status``'s): see router/live.py."""
        return JSONResponse(self._snapshot(await self._store_stats()))

    def _snapshot(self, store: StoreStats | None) -> dict[str, Any]:
        return snapshot(self.routing.pool_loads(), store, self.requests, self._rates)

    async def _store_stats(self) -> StoreStats | None:
        return await asyncio.to_thread(self._cached_store_stats)

    def _cached_store_stats(self) -> StoreStats | None:
        """The store's snapshot, collected at most once a second however many pages poll and
        however often the Ray export runs (they share it; the lock keeps two from collecting)."""
        with self._store_stats_lock:
            now = time.monotonic()
            if now - self._store_stats_at[0] >= 1.0 and self.spec.redis_url:
                self._store_stats_at = (now, self._collect_store())
            return self._store_stats_at[1]

    def _collect_store(self) -> StoreStats | None:
        """The store's numbers now; None when Redis does not answer (the page says so, the
        pools still show)."""
        meta = MetadataStore(connect(self.spec.redis_url), self.spec.store_prefix)
        try:
            return collect(meta, self._store_auth)
        except Exception as e:
            log.warning("store stats unavailable: %s", e)
            return None
        finally:
            meta.client.close()

    def _metrics_text(self, stats: StoreStats | None, rates: CounterRates) -> str:
        """Prometheus text: the store's metrics, this router's view of its pools' replicas,
        the requests it served (router/metrics.py)."""
        store = render_prometheus(stats) if self.spec.redis_url else ""
        pools = render_pools(snapshot(self.routing.pool_loads(), stats, self.requests, rates))
        return store + pools + self._own_metrics()

    def _export_text(self, whole_cluster: bool, rates: CounterRates) -> str:
        """What goes out through Ray's metrics export (``router.ray_export``): what /metrics
        serves from one replica, which speaks for the store and the pools; from the others,
        only the requests each served."""
        if whole_cluster:
            return self._metrics_text(self._cached_store_stats(), rates)
        return self._own_metrics()

    def _own_metrics(self) -> str:
        return render_requests(self.requests, self._inbox.counters() if self._inbox else None)

    @app.get("/debug/store-index")
    async def store_index_stats(self) -> JSONResponse:
        stats = asdict(self.routing.store.stats())
        stats["feed_healthy"] = bool(self._index_feed and self._index_feed.healthy)
        return JSONResponse(stats)

    @app.get("/debug/replicas")
    async def replicas(self) -> JSONResponse:
        """This router replica's measurements per engine replica (prefill rates, work in
        flight) and the store's transfer costs: the inputs of kv_aware's scores."""
        return JSONResponse(self.routing.snapshot())

    @app.get("/debug/routes")
    async def routes(self, last: int = 20) -> JSONResponse:
        """The last routing decisions of this router replica: candidates, scores, the rule."""
        recent = self.routing.recent(max(1, min(last, 1000)))
        return JSONResponse([{"request_id": rid, **{role: d.explain() for role, d in by_role.items()}}
                             for rid, by_role in recent])

    @app.get("/debug/routes/{request_id}")
    async def route_of(self, request_id: str) -> JSONResponse:
        found = self.routing.decisions(request_id)
        if not found:
            raise NotFound(f"no routing decision kept for request {request_id!r}")
        return JSONResponse({"request_id": request_id, **{role: d.explain() for role, d in found.items()}})

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        card = {"id": self.spec.served_model_name, "object": "model", "created": self._created,
                "owned_by": "pdserve", "max_model_len": self.spec.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        received = time.monotonic()
        req = parse(CompletionRequest, await self._body(request))
        self._check_model(req.model)
        if req.echo or req.suffix:
            raise BadRequest("echo and suffix are not supported", param="echo" if req.echo else "suffix")
        prompt = req.single_prompt()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
        sampling = self._sampling(req, req.max_tokens, req.logprobs, len(ids))
        return await self._respond("completion", req.stream, req.stream_options, req.return_token_ids, ids, sampling,
                                   received)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        received = time.monotonic()
        req = parse(ChatCompletionRequest, await self._body(request))
        self._check_model(req.model)
        ids = self.tokenizer.chat([{"role": m.role, "content": m.text()} for m in req.messages])
        sampling = self._sampling(req, req.effective_max_tokens(), req.num_logprobs(), len(ids))
        return await self._respond("chat", req.stream, req.stream_options, req.return_token_ids, ids, sampling,
                                   received)

    # -- validation -----------------------------------------------------------------------

    async def _body(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.spec.max_body_bytes:
            raise PayloadTooLarge(f"request body over {self.spec.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > self.spec.max_body_bytes:
            raise PayloadTooLarge(f"request body over {self.spec.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None

    def _check_model(self, model: str) -> None:
        if model != self.spec.served_model_name:
            raise NotFound(f"model {model!r} does not exist; this server serves "
                           f"{self.spec.served_model_name!r}", param="model", code="model_not_found")

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(ids)

    def _sampling(self, req: Any, max_tokens: int | None, logprobs: int | None, n_prompt: int) -> SamplingSpec:
        limit = self.spec.max_model_len
        if n_prompt >= limit:
            raise BadRequest(f"this model's maximum context length is {limit} tokens; the prompt "
                             f"has {n_prompt}", param="messages" if hasattr(req, "messages") else "prompt",
                             code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(self.spec.default_max_tokens, limit - n_prompt)
        elif n_prompt + max_tokens > limit:
            raise BadRequest(f"max_tokens ({max_tokens}) + prompt ({n_prompt} tokens) exceeds the "
                             f"context length ({limit})", param="max_tokens", code="context_length_exceeded")
        return SamplingSpec(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            seed=req.seed, stop=req.stop_list(), logprobs=logprobs, ignore_eos=req.ignore_eos)

    # -- the disaggregated path -------------------------------------------------------------

    async def _call_prefill(self, req: EngineRequest, hint: RoutingRequest) -> EngineDelta:
        call = self._prefill.prefill.remote(req.encode(), routing=hint.encode())
        engine_s = None
        try:
            delta = EngineDelta.decode(await call)
            engine_s = delta.engine_s  # against the decision's prediction (RateMeter.took)
            return delta
        except asyncio.CancelledError:  # timed out, or the client left: stop the engine's work
            call.cancel()
            raise
        except Exception as e:
            raise self._translated(e, hint) from e
        finally:
            self.routing.finished(hint.request_id, engine_s)

    def _call_decode(self, req: EngineRequest, hint: RoutingRequest) -> AsyncIterator[EngineDelta]:
        if self.spec.decode_stream == "serve":
            return self._decode_served(req, hint)
        return self._decode_into_inbox(req, hint)

    async def _decode_into_inbox(self, req: EngineRequest, hint: RoutingRequest) -> AsyncIterator[EngineDelta]:
        """The decode replica sends the deltas to this replica's token inbox, batched per step
        with its other requests from here (``kvstore.token_channel``); the call answers their count."""
        if self._inbox is None:
            self._inbox = TokenInbox(get_node_ip_address())
        call = self._decode.decode_into.remote(req.encode(), self._inbox.encoded_address, routing=hint.encode())
        with self._inbox.open(req.request_id) as deltas:
            deltas.settle_with(call)
            # All that arrived since the last pass, as one delta: the client gets them in one
            # chunk when this replica falls behind, and each chunk costs the HTTP path the same
            # whatever it carries.
            merged = (EngineDelta.merge([EngineDelta.decode(raw) for raw in batch]) async for batch in deltas.batches())
            async for delta in self._guarded(merged, call.cancel, hint):
                yield delta

    async def _decode_served(self, req: EngineRequest, hint: RoutingRequest) -> AsyncIterator[EngineDelta]:
        """Each delta is an item of the Serve call's stream (one Ray object each)."""
        stream = self._decode_streamed.decode.remote(req.encode(), routing=hint.encode())
        async for delta in self._guarded((EngineDelta.decode(raw) async for raw in stream), stream.cancel, hint):
            yield delta

    async def _guarded(self, deltas: AsyncIterator[EngineDelta], cancel: Callable[[], Any],
                       hint: RoutingRequest) -> AsyncIterator[EngineDelta]:
        """An engine call's deltas with its failure translated (``router.faults``); closed
        early (client gone, timeout), the call is cancelled: the engine aborts the request and
        frees its KV."""
        done = False
        try:
            async for delta in deltas:
                yield delta
            done = True
        except Exception as e:
            done = True
            raise self._translated(e, hint) from e
        finally:
            if not done:
                cancel()

    def _translated(self, e: Exception, hint: RoutingRequest) -> BaseException:
        decision = self.routing.decisions(hint.request_id).get(hint.role)
        return translate(e, decision.chosen if decision else "")

    async def _respond(self, kind: str, stream: bool, stream_options: Any, want_ids: bool,
                       ids: list[int], sampling: SamplingSpec, received: float) -> Response:
        rid = uuid.uuid4().hex
        keys = tuple(chunk_keys(self.namespace, ids))
        gen = Generation(trace=Trace())
        builder = ResponseBuilder(kind, rid, self.spec.served_model_name, len(ids),
                                  self.tokenizer.decode_token, want_ids)
        deadline = self._deadline(received)
        # The first token is awaited before any byte is sent, so a failed prefill is a
        # clean error status, streaming or not.
        try:
            async with asyncio.timeout_at(deadline):
                first = await first_token(rid, ids, sampling, keys, self._call_prefill, gen.trace, self.retries)
            gen.trace.prefill_node = self.routing.node_of(gen.trace.prefill_replica.removeprefix("prefill-"))
        except Exception as e:
            raise self._failed("prefill", e, gen.trace) from None
        gen.add(first)
        first_at = time.monotonic()
        tail = rest(rid, ids, sampling, keys, first, self._call_decode, gen.trace, self.retries)
        headers = {"x-pdserve-request-id": rid, "x-pdserve-route": self._route_header(rid)}
        if not stream:
            try:
                async for delta in _before(deadline, tail):
                    gen.add(delta)
            except Exception as e:
                raise self._failed("decode", e, gen.trace) from None
            self._served(gen, len(ids), received, first_at)
            return JSONResponse(builder.full(gen), headers=headers)
        include_usage = bool(stream_options and stream_options.include_usage)
        return StreamingResponse(self._events(builder, gen, first, tail, include_usage, (len(ids), received, first_at),
                                              deadline),
                                 media_type="text/event-stream", headers=headers)

    def _deadline(self, received: float) -> float | None:
        """``request_timeout_s`` after the request arrived, on the event loop's clock."""
        if self.spec.request_timeout_s <= 0:
            return None
        return asyncio.get_running_loop().time() + self.spec.request_timeout_s - (time.monotonic() - received)

    def _failed(self, stage: str, e: Exception, trace: Trace) -> APIError:
        """The client's error for a request that failed after admission (counted)."""
        self._count_recoveries(trace)
        if isinstance(e, Overloaded):
            self.requests.fault("rejected")
            return e
        if isinstance(e, APIError):
            return e
        if isinstance(e, TimeoutError):
            self.requests.fault("timed_out")
            return Unavailable(f"the request did not finish within {self.spec.request_timeout_s:g} s "
                               f"(router.request_timeout_s)", code="request_timeout")
        self.requests.fault("failed")
        if isinstance(e, ReplicaLost):
            return Unavailable(f"{stage} failed: every attempt lost its replica ({e})", code="replica_lost")
        return Unavailable(f"{stage} failed: {type(e).__name__}: {e}")

    def _count_recoveries(self, trace: Trace) -> None:
        self.requests.fault("prefill_retries", trace.prefill_retries)
        self.requests.fault("decode_resumes", trace.decode_resumes)

    def _served(self, gen: Generation, n_prompt: int, received: float, first_at: float) -> None:
        self._count_recoveries(gen.trace)
        n_out, now = len(gen.token_ids), time.monotonic()
        tpot = (now - first_at) / (n_out - 1) if n_out > 1 else None
        self.requests.record(first_at - received, tpot, n_prompt, gen.trace.prefill_cached_tokens, n_out, now)

    def _route_header(self, rid: str) -> str:
        """The prefill decision in one line: policy, chosen replica, the rule, and the best
        candidates' scores (all of them at /debug/routes/<request id>)."""
        d = self.routing.decisions(rid).get("prefill")
        if d is None:
            return ""
        best = ",".join(f"{s.replica}={s.score:.4g}" for s in d.top(4))
        return f"policy={d.policy}; chosen={d.chosen}; why={d.why}; scores={best}"

    async def _events(self, builder: ResponseBuilder, gen: Generation, first: EngineDelta,
                      tail: AsyncIterator[EngineDelta], include_usage: bool,
                      timing: tuple[int, float, float], deadline: float | None) -> AsyncIterator[str]:
        yield _sse(builder.chunk(first.text, first.token_ids, first.logprobs, first.finish_reason))
        try:
            async for delta in _before(deadline, tail):
                gen.add(delta)
                yield _sse(builder.chunk(delta.text, delta.token_ids, delta.logprobs, delta.finish_reason))
            self._served(gen, *timing)
        except Exception as e:  # headers are gone: report in-band, as OpenAI does
            log.warning("decode failed mid-stream: %s", e)
            yield _sse(self._failed("decode", e, gen.trace).body())
        if include_usage:
            yield _sse(builder.usage_chunk(gen))
        yield "data: [DONE]\n\n"
