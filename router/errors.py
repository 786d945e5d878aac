"""Typed errors inside the router; they become OpenAI-style JSON only at the HTTP edge.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code or self.type}
        }

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(APIError):
    status = 413
    type = "request_too_large"


class Unprocessable(APIError):
    status = 422
    type = "invalid_request_error"


class Overloaded(APIError):
    """Past an admission limit: the client should come back after ``retry_after_s``."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int = 1) -> None:
        super().__init__(message, param, code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Unavailable(APIError):
    status = 503
    type = "service_unavailable"
