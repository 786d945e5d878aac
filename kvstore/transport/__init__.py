"""Transports for slot bytes; see ``base`` for the contract every one of them keeps."""

from __future__ import annotations

from kvstore.transport.base import OnSlot, SlotHost, Transport, TransportError
from kvstore.transport.grpc_stream import GrpcTransport
from kvstore.transport.shm import ShmTransport
from kvstore.transport.tcp import TcpSlotServer, TcpTransport

REMOTE_TRANSPORTS: dict[str, type[Transport]] = {"tcp": TcpTransport, "grpc": GrpcTransport}

__all__ = [
    "GrpcTransport", "OnSlot", "REMOTE_TRANSPORTS", "ShmTransport", "SlotHost", "TcpSlotServer",
    "TcpTransport", "Transport", "TransportError",
]
