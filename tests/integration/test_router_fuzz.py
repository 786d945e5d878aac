"""Property-based fuzzing of the router's HTTP API through real Ray Serve (fake engines): well
over a thousand generated requests: bodies drawn field by field over every property the
served OpenAPI document declares (in range and out of it, of the right type and not), valid
bodies with one field replaced by arbitrary JSON, arbitrary JSON and raw bytes, and the GET
endpoints' parameters. Not one answer may be a 5xx, every error
must be OpenAI-shaped, and the router must serve normally afterwards.

The run's size is ``PDSERVE_FUZZ_EXAMPLES`` generated requests, spread over the four kinds:
400 by default (CI), ``PDSERVE_FUZZ_EXAMPLES=4000`` for the long run (docs/reliability.md)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fakes import MODEL, router_with_fakes

EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "400"))
SEEN: Counter[int] = Counter()  # status codes of every fuzzed request, over the module
ERROR_TYPES = {"invalid_request_error", "authentication_error", "not_found_error", "request_too_large",
               "rate_limit_error", "service_unavailable"}
FUZZ = settings(max_examples=max(1, EXAMPLES // 4), deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    spec = {"max_model_len": 256, "default_max_tokens": 4, "max_body_bytes": 16 * 1024}
    with router_with_fakes("pdserve-fuzz-test", spec) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield url
        assert sum(SEEN.values()) >= EXAMPLES, SEEN  # the run's promised size, every one answered
        # Healthy afterwards: alive, and a plain request is served as before.
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == " Paris.."


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def schemas(client: httpx.Client) -> dict[str, Any]:
    doc = client.get("/openapi.json").json()
    return dict(doc["components"]["schemas"])


def post(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    """JSON as a lenient client writes it (NaN and Infinity included)."""
    raw = json.dumps(body, allow_nan=True).encode()
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def check(r: httpx.Response) -> None:
    SEEN[r.status_code] += 1
    assert r.status_code < 500, (r.status_code, r.text[:500], r.request.content[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["type"] in ERROR_TYPES and isinstance(err["message"], str) and err["message"], r.text


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=12)
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
TEXT = st.text(max_size=40) | st.sampled_from(["", "\x00", "\ud7ff" * 3, "\U0001f600", "Paris " * 50])
INTS = st.integers(-3, 3000) | st.integers() | st.sampled_from([0, -1, 2**31, 2**63, 10**30])
COMMON = {
    "max_tokens": st.none() | INTS, "temperature": st.floats(allow_nan=True) | INTS, "top_p": st.floats() | INTS,
    "seed": st.none() | INTS, "stop": st.none() | TEXT | st.lists(TEXT, max_size=6), "n": st.none() | INTS,
    "stream": st.booleans() | JSON, "ignore_eos": st.booleans(), "return_token_ids": st.booleans(),
    "stream_options": st.none() | JSON | st.fixed_dictionaries({}, optional={"include_usage": JSON}),
}
PROMPTS = TEXT | st.lists(INTS, max_size=300) | st.lists(TEXT, max_size=3) | st.lists(st.lists(INTS, max_size=8),
                                                                                         max_size=3)
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""]), "text": TEXT | JSON})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot"])},
    optional={"content": st.none() | TEXT | st.lists(PART, max_size=3) | JSON, "name": TEXT},
)
BODIES = {
    "CompletionRequest": st.fixed_dictionaries({"model": st.just(MODEL) | TEXT, "prompt": PROMPTS}, optional={
        **COMMON, "logprobs": st.none() | INTS | st.booleans(), "echo": st.booleans(), "suffix": st.none() | TEXT}),
    "ChatCompletionRequest": st.fixed_dictionaries(
        {"model": st.just(MODEL) | TEXT, "messages": st.lists(MESSAGE, max_size=4)}, optional={
            **COMMON, "logprobs": st.booleans() | JSON, "top_logprobs": st.none() | INTS,
            "max_completion_tokens": st.none() | INTS}),
}


def test_the_fuzzed_fields_are_the_served_schemas(schemas: dict[str, Any]) -> None:
    """What the fuzzer draws and what /openapi.json declares are the same set of fields."""
    for name, strategy in BODIES.items():
        declared = set(schemas[name]["properties"])
        drawn = {*strategy.wrapped_strategy.mapping, *strategy.wrapped_strategy.optional}  # type: ignore[attr-defined]
        assert declared == drawn, (name, declared ^ drawn)


@FUZZ
@given(data=st.data())
def test_schema_bodies_get_answers_not_crashes(client: httpx.Client, data: Any) -> None:
    path = data.draw(PATHS)
    body = data.draw(BODIES["CompletionRequest" if path == "/v1/completions" else "ChatCompletionRequest"])
    check(post(client, path, body))


@FUZZ
@given(data=st.data(), value=JSON)
def test_one_field_replaced_by_anything(client: httpx.Client, data: Any, value: Any) -> None:
    path = data.draw(PATHS)
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 2}
    if path == "/v1/completions":
        body["prompt"] = "The capital of France is"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    field = data.draw(st.sampled_from([*body, "stream", "stream_options", "stop", "n", "temperature", "top_p",
                                       "logprobs", "top_logprobs", "seed", "max_completion_tokens", "echo"]))
    body[field] = value
    check(post(client, path, body))


@FUZZ
@given(path=PATHS, body=JSON | st.binary(max_size=300).map(lambda b: b"\xff" + b))
def test_arbitrary_json_and_bytes(client: httpx.Client, path: str, body: Any) -> None:
    if isinstance(body, bytes):
        check(client.post(path, content=body, headers={"content-type": "application/json"}))
    else:
        check(post(client, path, body))


@FUZZ
@given(last=st.text(max_size=12), rid=st.text(min_size=1, max_size=40))
def test_get_endpoints_with_any_parameters(client: httpx.Client, last: str, rid: str) -> None:
    check(client.get("/debug/routes", params={"last": last}))
    check(client.get(f"/debug/routes/{quote(rid, safe='')}"))
