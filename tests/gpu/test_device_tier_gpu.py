"""The device tier on a GPU (kvstore/transport/cuda_ipc.py): two spawned processes on GPU 0,
an owner (a prefill worker's tier) and a reader (a decode worker's pull, GPU xxh3 and scatter
through GpuKVPath.load_from_device), and a real redis-server between them.

- the owner saves random chunks into its tier; the reader pulls them through CUDA IPC and
  every one verifies and lands in its blocks byte for byte;
- a slot the owner rewrote after publishing fails the reader's checksum: reported, not written;
- a slot the ring reused has lost its mapping (compare-and-delete): not offered at all;
- an owner gone without a word (no record, its mappings still there) is a fallback for every
  chunk it held; one that closed has withdrawn its mappings: nothing is offered.

Needs only torch, Triton, redis-py and redis-server (no vLLM, no Ray):
``python3 -m pytest -q --noconftest tests/gpu/test_device_tier_gpu.py`` on the GPU machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.device import DEVICE, SKIP_REASON

if DEVICE is None or DEVICE.name != "cuda":
    pytest.skip(SKIP_REASON if DEVICE is None else "the device tier needs CUDA", allow_module_level=True)

NODE = "node-0"
LAYERS, PER = 2, 4  # a chunk: 2 layers x 4 blocks of 128 KiB
ROW = 128 << 10
CHUNK = LAYERS * PER * ROW  # 1 MiB
N_SLOTS = 6
DEADLINE_S = 120  # per command (the reader's first one compiles the xxh3 kernels)

pytestmark = pytest.mark.timeout(300)


def _owner(redis_url: str, prefix: str, conn: Connection) -> None:
    """The prefill side: a DeviceTier of N_SLOTS slots on GPU 0, driven by ``conn``."""
    import torch

    from kvstore.metadata import MetadataStore, connect, tier_owner_name
    from kvstore.segment import checksum
    from kvstore.transport.cuda_ipc import DeviceTier

    torch.cuda.set_device(0)
    tier = DeviceTier.allocate(MetadataStore(connect(redis_url), prefix), NODE, torch.device("cuda:0"), CHUNK,
                               N_SLOTS * CHUNK)
    conn.send(("ready", tier.owner))
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "save":  # arg: keys; random chunks -> (checksums, their bytes, slots)
                flat = torch.randint(0, 256, (len(arg) * CHUNK,), dtype=torch.uint8, device="cuda:0")
                host = flat.cpu().numpy().tobytes()
                sums = [checksum(memoryview(host)[c * CHUNK : (c + 1) * CHUNK]) for c in range(len(arg))]
                tier.stage(flat, len(arg), CHUNK)
                slots = list(tier._staged)
                torch.cuda.synchronize()
                assert tier.publish(arg, sums) == len(arg)
                conn.send((sums, host, slots))
            elif cmd == "rewrite":  # arg: a slot, rewritten without telling Redis
                tier.buffer[arg * CHUNK : (arg + 1) * CHUNK].add_(1)
                torch.cuda.synchronize()
                conn.send("ok")
            elif cmd == "vanish":  # as a crash would leave it: no record, the mappings still there
                tier._stop.set()
                assert tier._renewer is not None
                tier._renewer.join(timeout=5)
                tier.meta.client.delete(tier_owner_name(tier.meta.prefix, tier.owner))
                conn.send("ok")
            elif cmd == "stop":
                break
    finally:
        tier.close()
    conn.send("closed")


def _reader(redis_url: str, prefix: str, conn: Connection) -> None:
    """The decode side: a paged cache of LAYERS x 64 blocks, the GPU KV path, a TierReader."""
    import torch

    from kvstore.gpu_path import GpuKVPath
    from kvstore.metadata import ChunkLocation, MetadataStore, connect
    from kvstore.transport.cuda_ipc import TierReader, ipc_opener

    torch.cuda.set_device(0)
    blocks = [torch.zeros(64, ROW, dtype=torch.uint8, device="cuda:0") for _ in range(LAYERS)]
    path = GpuKVPath(blocks)
    assert path.gpu_checksums, "the GPU xxh3 did not come up"
    reader = TierReader(MetadataStore(connect(redis_url), prefix), NODE, ipc_opener(path.device))
    conn.send(("ready", os.getpid()))
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            break
        keys, sums = arg  # "load": chunk i into blocks i*PER.. of every layer
        locs = [ChunkLocation(NODE, "seg", 0, CHUNK, s) for s in sums]
        found = reader.sources(keys, locs, CHUNK)
        targets = [(tuple(range(i * PER, (i + 1) * PER)), 0) for i in found.idx]
        for b in blocks:
            b.zero_()
        ok = path.load_from_device(found.srcs, [sums[i] for i in found.idx], targets, PER)
        torch.cuda.synchronize()
        got = {i: torch.cat([b[i * PER : (i + 1) * PER].reshape(-1) for b in blocks]).cpu().numpy().tobytes()
               for i in range(len(keys))}
        conn.send((found.idx, found.failed, ok, got))
    reader.close()
    path.close()
    conn.send("closed")


def _call(conn: Connection, cmd: str, arg: Any = None) -> Any:
    conn.send((cmd, arg))
    assert conn.poll(DEADLINE_S), f"no answer to {cmd} within {DEADLINE_S} s"
    return conn.recv()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from cluster.runtime import start_redis_child

    proc, url, _port = start_redis_child(Path(tmp_path_factory.mktemp("redis")))
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sides(redis_url: str) -> Iterator[dict[str, Connection]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    prefix = f"dt{os.getpid()}"
    ends: dict[str, Connection] = {}
    procs = []
    for role, target in (("owner", _owner), ("reader", _reader)):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=target, args=(redis_url, prefix, theirs), name=f"dtier-{role}")
        p.start()
        procs.append(p)
        ends[role] = mine
        assert mine.poll(DEADLINE_S), f"the {role} did not start"
        assert mine.recv()[0] == "ready"
    try:
        yield ends
    finally:
        for end in ends.values():
            try:
                end.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def chunk_keys(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}".encode().ljust(16, b"_") for i in range(n)]


def test_a_reader_pulls_the_owners_chunks_through_cuda_ipc_and_they_verify(sides: dict[str, Connection]) -> None:
    keys = chunk_keys("a", 4)
    sums, host, _slots = _call(sides["owner"], "save", keys)
    idx, failed, ok, got = _call(sides["reader"], "load", (keys, sums))
    assert idx == [0, 1, 2, 3] and failed == 0 and ok == [True] * 4
    for i in range(4):
        assert got[i] == host[i * CHUNK : (i + 1) * CHUNK], f"chunk {i} landed different bytes"


def test_a_slot_rewritten_after_its_save_fails_the_checksum_and_is_not_written(
    sides: dict[str, Connection],
) -> None:
    keys = chunk_keys("b", 2)
    sums, host, slots = _call(sides["owner"], "save", keys)
    assert _call(sides["owner"], "rewrite", slots[1]) == "ok"
    idx, failed, ok, got = _call(sides["reader"], "load", (keys, sums))
    assert idx == [0, 1] and ok == [True, False], ok  # chunk 1: a fallback to the host path
    assert got[0] == host[:CHUNK]
    assert got[1] == bytes(CHUNK), "a chunk that failed its checksum was written"


def test_a_reused_slot_is_not_offered_and_a_vanished_owner_falls_back(sides: dict[str, Connection]) -> None:
    first = chunk_keys("c", 3)
    sums, _host, slots = _call(sides["owner"], "save", first)
    later = chunk_keys("d", N_SLOTS - 1)  # the ring comes round: it reuses first's slots but the last
    later_sums, _host, later_slots = _call(sides["owner"], "save", later)
    assert set(slots[:2]) <= set(later_slots) and slots[2] not in later_slots, (slots, later_slots)
    idx, failed, ok, _got = _call(sides["reader"], "load", (first, sums))
    assert idx == [2] and failed == 0 and ok == [True], (idx, failed, ok)  # the reused ones' mappings are gone
    assert _call(sides["owner"], "vanish") == "ok"
    idx, failed, ok, _got = _call(sides["reader"], "load", (first + later, sums + later_sums))
    assert idx == [] and failed == 1 + len(later), (idx, failed)  # every live mapping: to the host path
    assert _call(sides["owner"], "stop") == "closed"  # close() withdraws the mappings too
    idx, failed, ok, _got = _call(sides["reader"], "load", (first + later, sums + later_sums))
    assert idx == [] and failed == 0, (idx, failed)
