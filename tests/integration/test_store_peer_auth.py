"""Store agents take only peers of their cluster: a real agent on loopback, real sockets and
gRPC, real certificates. Every wire refuses a peer without the store token (derived from the
Redis password), and with TLS configured only the grpc transport is served, encrypted, to
clients whose certificate the cluster CA issued."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvstore.agent import StoreAgent
from kvstore.agent_rpc import AgentClient, AgentServers, AgentUnavailable
from kvstore.client import ChunkToSave, StoreClient
from kvstore.peer_auth import TLS_SERVER_NAME, PeerAuth, TlsFiles, store_token
from kvstore.transport import REMOTE_TRANSPORTS, TransportError

from .conftest import AgentFactory
from .test_transport_contract import content, make_key


def _stored(agent: StoreAgent, redis_url: str, prefix: str, n: int = 3) -> tuple[list[bytes], list]:
    """Chunks written on the agent's node; their keys and locations."""
    c = StoreClient(redis_url, prefix, agent.node_id)
    keys = [make_key("auth", i) for i in range(n)]
    fill = lambda i, v: v.__setitem__(slice(None), content(keys[i], 4096))  # noqa: E731
    assert c.batch_put([ChunkToSave(k, 4096) for k in keys], fill) == n
    locs = c.lookup(keys)
    c.close()
    return keys, locs


@pytest.mark.parametrize("name", sorted(REMOTE_TRANSPORTS))
def test_a_transport_without_the_token_is_refused_and_the_agent_keeps_serving(
    make_agent: AgentFactory, redis_url: str, prefix: str, name: str,
) -> None:
    agent = make_agent()
    keys, locs = _stored(agent, redis_url, prefix)
    lengths = [loc.length + 64 for loc in locs]
    offsets = [loc.offset for loc in locs]
    strangers = {
        "no token": PeerAuth(),
        "another cluster's token": PeerAuth(store_token("redis://:other@127.0.0.1:1/0", prefix)),
        "another store's token": PeerAuth.for_store(redis_url, prefix + "x"),
    }
    for who, auth in strangers.items():
        t = REMOTE_TRANSPORTS[name](auth, timeout_s=2.0)
        with pytest.raises(TransportError, match="unauthenticated|UNAUTHENTICATED"):
            t.read(agent.info(), offsets, lengths, lambda i, v: None)
        with pytest.raises(TransportError, match="unauthenticated|UNAUTHENTICATED"):
            t.write(agent.info(), offsets[:1], lengths[:1], memoryview(bytes(lengths[0])))
        t.close()
        assert agent.snapshot().pinned == 0, who  # a refused read pinned nothing

    # The cluster's own peer still reads every chunk, bytes intact.
    member = StoreClient(redis_url, prefix, "node-B", transport=name)
    got: dict[int, bytes] = {}
    assert member.batch_get(keys, locs, lambda i, p: got.__setitem__(i, bytes(p))) == [True] * 3
    assert [got[i] for i in range(3)] == [content(k, 4096) for k in keys]
    assert member.drain_counters()["loaded_remote_chunks"] == 3
    member.close()


def test_control_calls_without_the_token_are_refused(make_agent: AgentFactory, redis_url: str, prefix: str) -> None:
    agent = make_agent()
    stranger = AgentClient(agent.address, PeerAuth(), timeout_s=2.0)
    for call in (lambda: stranger.allocate([4096]), stranger.stats, stranger.clear):
        with pytest.raises(AgentUnavailable, match="UNAUTHENTICATED"):
            call()
    stranger.close()
    assert agent.snapshot().pending == 0 and agent.snapshot().allocated == 0
    member = AgentClient(agent.address, PeerAuth.for_store(redis_url, prefix))
    assert member.stats().capacity == agent.alloc.capacity
    member.close()


def test_the_tcp_slot_server_shrugs_off_a_silent_or_garbled_peer(
    make_agent: AgentFactory, redis_url: str, prefix: str,
) -> None:
    agent = make_agent()
    host, port = agent.data_address.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)))  # connects, then never answers
    with socket.create_connection((host, int(port))) as garbled:
        assert garbled.recv(4, socket.MSG_WAITALL) == b"PDKH"
        garbled.recv(32, socket.MSG_WAITALL)
        garbled.sendall(b"\x00" * 32 + b"PDKT\x01" + b"\xff" * 64)  # a wrong answer, then a request
        assert b"unauthenticated" in garbled.recv(4096)
        try:  # then hung up (reset: the request it never read was still in its buffer)
            assert garbled.recv(4096) == b""
        except ConnectionResetError:
            pass
    keys, locs = _stored(agent, redis_url, prefix, 1)
    member = StoreClient(redis_url, prefix, "node-B")
    assert member.batch_get(keys, locs, lambda i, p: None) == [True]  # the silent peer blocks nobody
    member.close()
    silent.close()


def test_store_token_is_the_clusters_and_the_stores() -> None:
    a = store_token("redis://:s3cret@10.0.0.1:6379/0", "pdkv")
    assert a == store_token("redis://:s3cret@10.0.0.2:7000/0", "pdkv")  # every node derives the same
    assert a is not None and len(a) == 32 and b"s3cret" not in a
    assert a != store_token("redis://:other@10.0.0.1:6379/0", "pdkv")
    assert a != store_token("redis://:s3cret@10.0.0.1:6379/0", "pdkv2")
    assert store_token("redis://127.0.0.1:6379/0", "pdkv") is None  # no password: nothing to derive from


# -- TLS ---------------------------------------------------------------------------------------


def _pki(where: Path, name: str) -> TlsFiles:
    """A CA and one certificate it issued for the store's TLS name, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_SERVER_NAME)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    where.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(cert=str(where / "store.pem"), key=str(where / "store.key"), ca=str(where / "ca.pem"))
    Path(files.cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(files.ca).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    Path(files.key).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    ))
    return files


def test_tls_agent_serves_grpc_to_cluster_peers_only(redis_url: str, prefix: str, tmp_path: Path) -> None:
    tls = _pki(tmp_path / "cluster", "cluster")
    agent = StoreAgent("node-A", redis_url, 16 << 20, prefix)
    servers = AgentServers(agent, "127.0.0.1", PeerAuth.for_store(redis_url, prefix, tls))
    agent.tick()
    try:
        assert servers.tcp is None and agent.data_address == ""  # no plaintext slot server under TLS
        writer = StoreClient(redis_url, prefix, "node-A", transport="grpc", tls=tls)
        keys = [make_key("tls", i) for i in range(2)]
        fill = lambda i, v: v.__setitem__(slice(None), content(keys[i], 8192))  # noqa: E731
        assert writer.batch_put([ChunkToSave(k, 8192) for k in keys], fill) == 2
        locs = writer.lookup(keys)
        writer.close()

        got: dict[int, bytes] = {}
        reader = StoreClient(redis_url, prefix, "node-B", transport="grpc", tls=tls)
        assert reader.batch_get(keys, locs, lambda i, p: got.__setitem__(i, bytes(p))) == [True, True]
        assert [got[0], got[1]] == [content(k, 8192) for k in keys]
        reader.close()

        lengths, offsets = [loc.length + 64 for loc in locs], [loc.offset for loc in locs]
        other_ca = _pki(tmp_path / "other", "other")
        strangers = {
            "plaintext, right token": PeerAuth.for_store(redis_url, prefix),
            "certificate of another CA": PeerAuth.for_store(redis_url, prefix, other_ca),
            "right certificate, no token": PeerAuth(None, tls),
        }
        for who, auth in strangers.items():
            t = REMOTE_TRANSPORTS["grpc"](auth, timeout_s=2.0)
            with pytest.raises(TransportError):
                t.read(agent.info(), offsets, lengths, lambda i, v: None)
            t.close()
            assert agent.snapshot().pinned == 0, who
        # A tcp reader finds no slot server: a miss (recompute), never a hang or plaintext.
        tcp_reader = StoreClient(redis_url, prefix, "node-B", transport="tcp")
        assert tcp_reader.batch_get(keys, locs, lambda i, p: None) == [False, False]
        tcp_reader.close()
    finally:
        servers.stop(0)
        agent.close()
