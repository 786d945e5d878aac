"""The router's OpenAPI document (served at ``/openapi.json``).

The generate endpoints read their body themselves (size limit before parsing, then one
typed parse: ``router.protocol``), so FastAPI cannot infer their request schemas; they are
added here from the same pydantic models that validate the bodies, with the error shape
every endpoint answers in. Fuzzers and client generators read this document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from router.protocol import ChatCompletionRequest, CompletionRequest

_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
_ERRORS = {
    "400": "Invalid body: bad JSON, a field out of range, over the context length, unsupported options.",
    "401": "Missing or unknown API key (when keys are configured).",
    "404": "Unknown model.",
    "413": "Body over router.max_body_bytes.",
    "429": "Over the router's or a pool's admission limit; see Retry-After.",
    "503": "No replica could serve it in time (replicas lost on every attempt, or request_timeout_s).",
}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title="pdserve", version="1", routes=app.routes,
                      description="OpenAI-compatible API of a disaggregated prefill/decode cluster.")
    _, defs = models_json_schema([(m, "validation") for m in _BODIES.values()],
                                 ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs["$defs"])
    schemas["Error"] = _ERROR
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, model in _BODIES.items():
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        op["responses"] = {
            "200": {"description": "The completion (JSON), or a text/event-stream of chunks when stream is true.",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **{code: {"description": text, **error} for code, text in _ERRORS.items()},
        }
    app.openapi_schema = doc
    return doc
