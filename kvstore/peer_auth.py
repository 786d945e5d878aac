"""Who may talk to a Store Agent: peers that prove they hold the cluster's store token.

The root of trust is the metadata service. Whoever holds the Redis password can already
rewrite where every chunk lives, so the store token is derived from it (HMAC-SHA256 of the
password and the store prefix): every agent and engine that can reach Redis computes the
same token with nothing to distribute, nothing to rotate separately, and the password itself
never travels to an agent. A Redis without a password protects nothing, so neither does a
token derived from it: then the agents accept every peer and say so once in the log.

How each wire carries the proof:

    tcp   the server opens every connection with a 32-byte random challenge; the client
          answers HMAC(token, challenge). The token never crosses the wire, a recorded
          answer is worthless on the next connection. Plaintext bytes otherwise: with TLS
          configured the tcp slot server is not started at all.
    grpc  every call carries the token in the ``x-pdkv-token`` metadata; a server
          interceptor answers UNAUTHENTICATED to any call without the right one. Optional
          mutual TLS (one cluster certificate on both ends, each verified against the
          cluster CA) protects the token and the bytes on untrusted links.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kvstore.logging import get_logger
from kvstore.metadata import redis_password

log = get_logger(__name__)

TOKEN_METADATA = "x-pdkv-token"
CHALLENGE_BYTES = 32
# The name every agent's certificate is issued for: agents are reached by IP, and one cluster
# certificate then serves every node (gRPC checks the peer against this name, not the IP).
TLS_SERVER_NAME = "pdserve-store"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files present at the same paths on every node (``ray up`` file_mounts)."""

    cert: str  # this cluster's certificate, issued for TLS_SERVER_NAME
    key: str
    ca: str  # the CA that issued it: clients verify the agent, agents verify clients

    def read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()


@dataclass(frozen=True)
class PeerAuth:
    token: bytes | None = None  # None: Redis has no password, agents accept every peer
    tls: TlsFiles | None = None

    @classmethod
    def for_store(cls, redis_url: str, prefix: str, tls: TlsFiles | dict[str, str] | None = None) -> PeerAuth:
        if isinstance(tls, dict):
            tls = TlsFiles(**tls)
        return cls(store_token(redis_url, prefix), tls)

    # -- tcp: challenge and answer ------------------------------------------------------------

    def answer(self, challenge: bytes) -> bytes:
        if self.token is None:
            return bytes(CHALLENGE_BYTES)
        return hmac.new(self.token, challenge, hashlib.sha256).digest()

    def accepts_answer(self, challenge: bytes, answer: bytes) -> bool:
        return self.token is None or hmac.compare_digest(self.answer(challenge), answer)

    # -- grpc ---------------------------------------------------------------------------------

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA, self.token.hex()),) if self.token is not None else ()

    def accepts_metadata(self, metadata: Any) -> bool:
        if self.token is None:
            return True
        presented = next((v for k, v in metadata or () if k == TOKEN_METADATA), "")
        return hmac.compare_digest(self.token.hex().encode(), str(presented).encode())

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A client channel to an agent: TLS against the cluster CA when configured."""
        if self.tls is None:
            return grpc.insecure_channel(address, options=options)
        cert, key, ca = self.tls.read()
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        options = [*options, ("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
        return grpc.secure_channel(address, creds, options=options)

    def add_port(self, server: grpc.Server, address: str) -> int:
        """Bind the agent's gRPC server: TLS with client certificates when configured."""
        if self.tls is None:
            return server.add_insecure_port(address)
        cert, key, ca = self.tls.read()
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        return server.add_secure_port(address, creds)

    def interceptors(self) -> tuple[grpc.ServerInterceptor, ...]:
        if self.token is None:
            log.warning("Redis has no password, so the store agents accept every peer: give Redis a password")
            return ()
        return (_TokenInterceptor(self),)


def store_token(redis_url: str, prefix: str) -> bytes | None:
    """The store's peer token, derived from the Redis password its URL carries (or None)."""
    password = redis_password(redis_url)
    if password is None:
        return None
    return hmac.new(password.encode(), b"pdserve-store-peer\0" + prefix.encode(), hashlib.sha256).digest()


class _TokenInterceptor(grpc.ServerInterceptor):
    """Answers UNAUTHENTICATED, before any handler runs, to a call without the token."""

    def __init__(self, auth: PeerAuth) -> None:
        self._auth = auth

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or self._auth.accepts_metadata(details.invocation_metadata):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only refuses (gRPC drives a method by
    its declared streaming shape, so the refusal must have the same one)."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "this store agent takes only peers of its cluster")

    def refuse_stream(request: Any, context: grpc.ServicerContext) -> Any:
        refuse(request, context)
        yield b""  # never reached: makes this a generator, as a response stream must be

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)
