"""Every transport through the same suite: put, get, exists, batches, small and large chunks,
concurrent readers and writers, and the refusals that keep a wrong byte from being served.

``shm`` runs as a same-node client of the agent; ``tcp`` and ``grpc`` as a client on another
node (the same machine, but the client only reaches the agent through the transport).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from kvstore.agent import StoreAgent
from kvstore.client import ChunkToSave, StoreClient
from kvstore.metadata import ChunkLocation
from kvstore.peer_auth import PeerAuth
from kvstore.segment import HEADER_BYTES, checksum
from kvstore.transport import REMOTE_TRANSPORTS, ShmTransport, Transport, TransportError

from .conftest import AgentFactory

TRANSPORTS = ["shm", *REMOTE_TRANSPORTS]


def content(key: bytes, n: int) -> bytes:
    """Bytes derived from the key, so any chunk can be checked without remembering it."""
    seed = hashlib.blake2b(key, digest_size=32).digest()
    return (seed * (n // 32 + 1))[:n]


def make_key(tag: str, i: int) -> bytes:
    return hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest()


@pytest.fixture
def agent(make_agent: AgentFactory) -> StoreAgent:
    return make_agent("node-A", capacity=96 << 20)


@pytest.fixture(params=TRANSPORTS)
def client(request: pytest.FixtureRequest, agent: StoreAgent, redis_url: str, prefix: str) -> Iterator[StoreClient]:
    name = request.param
    node = "node-A" if name == "shm" else "node-B"
    c = StoreClient(redis_url, prefix, node, transport="tcp" if name == "shm" else name)
    yield c
    c.close()


def put(c: StoreClient, keys: list[bytes], sizes: list[int]) -> int:
    def fill(i: int, view: memoryview) -> None:
        view[:] = content(keys[i], sizes[i])

    return c.batch_put([ChunkToSave(k, n) for k, n in zip(keys, sizes, strict=True)], fill, node_id="node-A")


def get(c: StoreClient, keys: list[bytes], dest: bool = False) -> dict[int, bytes]:
    locs = c.lookup(keys)
    assert all(loc is not None for loc in locs)
    got: dict[int, bytes] = {}
    buf = None
    if dest:
        buf = memoryview(bytearray(sum(HEADER_BYTES + loc.length for loc in locs if loc)))
    ok = c.batch_get(keys, [loc for loc in locs if loc], lambda i, p: got.__setitem__(i, bytes(p)), buf)
    assert ok == [i in got for i in range(len(keys))]
    return got


@pytest.mark.parametrize(
    "sizes", [[1, 4096, (1 << 20) + 3, 64 << 10], [16 << 20], [1 << 20, (2 << 20) + 5, 1 << 20]],
    ids=["mixed", "16MiB", "large-run"],  # large-run: same-node reads split over two threads
)
def test_put_exists_get(client: StoreClient, sizes: list[int]) -> None:
    keys = [make_key("rt", i) for i in range(len(sizes))]
    assert client.batch_exists(keys) == [False] * len(keys)
    assert put(client, keys, sizes) == len(keys)
    assert client.batch_exists(keys + [make_key("absent", 0)]) == [True] * len(keys) + [False]
    for dest in (False, True):
        got = get(client, keys, dest=dest)
        assert got == {i: content(k, n) for i, (k, n) in enumerate(zip(keys, sizes, strict=True))}
    transport = "shm" if client.node_id == "node-A" else client.remote.name
    counters = client.drain_counters()
    assert counters[f"bytes_in_{transport}"] == 2 * sum(HEADER_BYTES + n for n in sizes)
    assert counters[f"get_seconds:{transport}_count"] == 2
    source = "local" if transport == "shm" else "remote"
    assert counters[f"loaded_{source}_chunks"] == 2 * len(keys)


def test_a_wrong_location_is_a_counted_miss_never_wrong_bytes(client: StoreClient) -> None:
    keys = [make_key("w", i) for i in range(3)]
    put(client, keys, [4096] * 3)
    locs = [loc for loc in client.lookup(keys) if loc]
    bad_sum = ChunkLocation(**{**locs[1].__dict__, "checksum": locs[1].checksum ^ 1})
    wrong_slot = ChunkLocation(**{**locs[2].__dict__, "offset": locs[0].offset})
    got: dict[int, bytes] = {}
    ok = client.batch_get(keys, [locs[0], bad_sum, wrong_slot], lambda i, p: got.__setitem__(i, bytes(p)))
    assert ok == [True, False, False] and got == {0: content(keys[0], 4096)}
    counters = client.drain_counters()
    # A wrong checksum in the location: the header disagrees before the payload is hashed.
    assert counters["slot_mismatches"] == 2
    assert counters["loaded_local_chunks" if client.node_id == "node-A" else "loaded_remote_chunks"] == 1


def test_corrupted_payload_fails_its_checksum(client: StoreClient, agent: StoreAgent) -> None:
    key = make_key("rot", 0)
    put(client, [key], [8192])
    loc = client.lookup([key])[0]
    assert loc is not None
    agent.segment.buf[loc.offset + HEADER_BYTES + 100] ^= 0xFF  # one flipped bit-group in the bytes
    ok = client.batch_get([key], [loc], lambda i, p: pytest.fail("corrupt bytes were delivered"))
    assert ok == [False] and client.drain_counters()["checksum_failures"] == 1
    assert client.batch_exists([key]) == [False]  # the damaged chunk was dropped from the store
    assert put(client, [key], [8192]) == 1 and get(client, [key]) == {0: content(key, 8192)}


def test_a_fill_that_took_the_checksum_is_sealed_with_it(client: StoreClient) -> None:
    """The CUDA path's fill returns the checksum it took on the GPU: the seal writes it as
    given (a wrong one is caught by the reader, so it is really the one used)."""
    keys, n = [make_key("taken", i) for i in range(2)], (1 << 20) + 7
    right = checksum(content(keys[0], n))

    def fill(i: int, view: memoryview) -> int:
        view[:] = content(keys[i], n)
        return right if i == 0 else right ^ 1

    assert client.batch_put([ChunkToSave(k, n) for k in keys], fill, node_id="node-A") == 2
    assert [loc.checksum for loc in client.lookup(keys) if loc] == [right, right ^ 1]
    assert get(client, keys) == {0: content(keys[0], n)}
    assert client.drain_counters()["checksum_failures"] == 1


def test_a_fill_of_all_chunks_at_once_is_called_once_and_sealed_per_chunk(client: StoreClient) -> None:
    """batch_put_all: one fill for every placed chunk (the CUDA path's one gather and hash per
    request); its digests seal each chunk, None has the client hash that one."""
    keys, n = [make_key("all", i) for i in range(3)], (1 << 20) + 7
    calls: list[int] = []

    def fill_all(payloads: list[memoryview]) -> list[int | None]:
        calls.append(len(payloads))
        for i, view in enumerate(payloads):
            view[:] = content(keys[i], n)
        return [checksum(content(keys[0], n)), None, checksum(content(keys[2], n))]

    assert client.batch_put_all([ChunkToSave(k, n) for k in keys], fill_all, node_id="node-A") == 3
    assert calls == [3]
    assert get(client, keys) == {i: content(keys[i], n) for i in range(3)}
    with pytest.raises(ValueError, match="digests"):  # one digest per chunk, or nothing is stored
        client.batch_put_all([ChunkToSave(make_key("short", 0), 64)], lambda p: [], node_id="node-A")
    assert client.batch_exists([make_key("short", 0)]) == [False]


def test_a_self_verifying_reader_gets_unverified_slots_and_its_verdict_counts(
    client: StoreClient, agent: StoreAgent,
) -> None:
    """batch_get_self_verified: the reader checks the bytes of all its same-node slots itself
    in one call (the CUDA path: on its GPU copies); a mismatch fails only that chunk, is a
    counted checksum failure and drops the slot. Chunks from another node were verified as
    they landed: they come to on_chunk, never to the check."""
    sizes = [4096, (2 << 20) + 3, 1 << 20]
    keys = [make_key("self", i) for i in range(3)]
    assert put(client, keys, sizes) == 3
    locs = [loc for loc in client.lookup(keys) if loc]
    got: dict[int, bytes] = {}
    checked: list[list[int]] = []
    local = client.node_id == "node-A"

    def check(idx: list[int], payloads: list[memoryview], digests: list[int]) -> list[bool]:
        checked.append(list(idx))
        verdicts = []
        for i, payload, digest in zip(idx, payloads, digests, strict=True):
            copy = bytes(payload)
            verdicts.append(checksum(copy) == digest)
            if verdicts[-1]:
                got[i] = copy
        return verdicts

    def on_chunk(i: int, payload: memoryview) -> None:
        assert not local, "a same-node chunk bypassed the reader's own check"
        got[i] = bytes(payload)

    assert client.batch_get_self_verified(keys, locs, check, on_chunk) == [True] * 3
    assert checked == ([[0, 1, 2]] if local else [])
    assert got == {i: content(keys[i], sizes[i]) for i in range(3)}
    assert client.drain_counters()["loaded_local_chunks" if local else "loaded_remote_chunks"] == 3
    agent.segment.buf[locs[1].offset + HEADER_BYTES + (1 << 20) + 9] ^= 0xFF
    got.clear()
    assert client.batch_get_self_verified(keys, locs, check, on_chunk) == [True, False, True]
    assert set(got) == {0, 2}
    assert client.drain_counters()["checksum_failures"] == 1
    assert client.batch_exists(keys) == [True, False, True]  # the damaged chunk was dropped


@pytest.mark.parametrize("dest", [False, True], ids=["view", "dest"])
def test_a_corrupt_block_in_a_large_run_loses_its_chunk(client: StoreClient, agent: StoreAgent, dest: bool) -> None:
    # Large enough to be verified block by block on two threads on the same node.
    sizes = [1 << 20, (3 << 20) + 5, 1 << 20, 1 << 20]
    keys = [make_key("run", i) for i in range(4)]
    assert put(client, keys, sizes) == 4
    for bad, at in ((0, 4096), (1, (2 << 20) + 1), (3, (1 << 20) - 1)):  # in each thread's half
        loc = client.lookup([keys[bad]])[0]
        assert loc is not None
        agent.segment.buf[loc.offset + HEADER_BYTES + at] ^= 0xFF
        got = get(client, keys, dest=dest)
        assert got == {i: content(keys[i], sizes[i]) for i in range(4) if i != bad}
        assert client.drain_counters()["checksum_failures"] == 1
        assert put(client, [keys[bad]], [sizes[bad]]) == 1  # stored again, whole


def test_concurrent_readers_and_writers(client: StoreClient, agent: StoreAgent, redis_url: str, prefix: str) -> None:
    transport = "tcp" if client.node_id == "node-A" else client.remote.name
    errors: list[str] = []
    seeded = [make_key("seed", i) for i in range(8)]
    put(client, seeded, [256 << 10] * 8)

    def worker(w: int) -> None:
        c = StoreClient(redis_url, prefix, client.node_id, transport=transport)
        try:
            for r in range(6):
                keys = [make_key(f"w{w}r{r}", i) for i in range(4)]
                if put(c, keys, [(64 << 10) * (1 + i) for i in range(4)]) != 4:
                    errors.append(f"worker {w} stored fewer than 4 chunks")
                for i, data in get(c, keys + seeded).items():
                    k = (keys + seeded)[i]
                    if data != content(k, len(data)):
                        errors.append(f"worker {w} read wrong bytes for chunk {i}")
        except Exception as e:
            errors.append(f"worker {w}: {type(e).__name__}: {e}")
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert agent.snapshot().pending == 0 and agent.snapshot().pinned == 0


@pytest.mark.parametrize("name", TRANSPORTS)
def test_transport_refuses_slots_outside_the_segment(agent: StoreAgent, name: str, redis_url: str, prefix: str) -> None:
    auth = PeerAuth.for_store(redis_url, prefix)
    t: Transport = ShmTransport() if name == "shm" else REMOTE_TRANSPORTS[name](auth)
    try:
        with pytest.raises(TransportError):
            t.read(agent.info(), [agent.segment.size - 8], [64], lambda i, v: None)
        if name != "shm":  # the agent checks a batch as a whole: one bad slot among good ones
            for bad in ((agent.segment.size - 8, 64), (128, 0)):
                with pytest.raises(TransportError):
                    t.read(agent.info(), [0, bad[0], 64], [64, bad[1], 64], lambda i, v: None)
            assert agent.snapshot().pinned == 0  # and a refused read pins nothing
        if name != "shm":  # shm writes are the writer's own mapping; remote ones are checked
            with pytest.raises(TransportError):
                t.write(agent.info(), [0], [64], memoryview(bytes(64)))  # not allocated to a write
            t.read(agent.info(), [0], [64], lambda i, v: None)  # a refusal leaves it usable
    finally:
        t.close()
