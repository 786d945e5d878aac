"""API keys: bearer tokens on the OpenAI endpoints (``/v1/*``) and the routing explanations
(``/debug/*``), as vLLM's ``--api-key`` guards ``/v1``. ``/health``, ``/metrics`` and the
dashboard stay open, for probes and Prometheus; put them behind your network's controls.

The router never holds a key, only its SHA-256: the digests travel in Serve's deployment
config, which ``serve status`` and Ray's dashboard show. A presented key is hashed and
compared against every digest in constant time, and no key, good or bad, is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from router.errors import Unauthorized

PROTECTED_PREFIXES = ("/v1/", "/debug/")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The keys this router accepts, as digests; none = every request is let in."""

    def __init__(self, digests: Iterable[str] = ()) -> None:
        self._digests = tuple(digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def guards(self, path: str) -> bool:
        return self.enabled and path.startswith(PROTECTED_PREFIXES)

    def check(self, authorization: str | None) -> None:
        """Raise ``Unauthorized`` unless ``authorization`` is ``Bearer <an accepted key>``."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        presented = key_digest(token.strip())
        if not any([hmac.compare_digest(presented, d) for d in self._digests]):  # all compared: no early exit
            raise Unauthorized("incorrect API key provided", code="invalid_api_key")
