"""The connector's view of an engine's KV cache as rows of whole blocks, for every layout the
engines hand it: contiguous (vLLM's CPU backend), split K/V, and the permuted view CUDA
FlashAttention gives (vLLM 0.26: logical [blocks, heads, tokens, 2*head] over memory
[blocks, tokens, heads, 2*head]). Row b must be exactly block b's bytes in memory. And who
checks a chunk's bytes: the client on CPU engines, the CUDA path on its own GPU copy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
from kvstore.connector import PDStoreConnector  # noqa: E402

BLOCKS, TOKENS, HEADS, DIM = 6, 4, 3, 8


def rows(cache: torch.Tensor) -> torch.Tensor:
    return PDStoreConnector._block_rows(SimpleNamespace(_num_blocks=BLOCKS), cache)  # type: ignore[arg-type]


def test_contiguous_cache_rows_are_whole_blocks_and_share_its_memory() -> None:
    cache = torch.arange(BLOCKS * HEADS * TOKENS * DIM, dtype=torch.float32).view(BLOCKS, HEADS, TOKENS, DIM)
    r = rows(cache)
    assert r.shape == (BLOCKS, HEADS * TOKENS * DIM) and r.data_ptr() == cache.data_ptr()
    assert torch.equal(r[2], cache[2].flatten())


def test_split_kv_layout_puts_both_halves_of_a_block_in_its_row() -> None:
    cache = torch.arange(2 * BLOCKS * TOKENS * DIM, dtype=torch.float32).view(2, BLOCKS, TOKENS, DIM)
    r = rows(cache)
    assert r.shape[0] == BLOCKS
    assert torch.equal(r[3].flatten(), torch.cat([cache[0, 3].flatten(), cache[1, 3].flatten()]))


def test_permuted_flash_attention_view_is_read_in_memory_order() -> None:
    memory = torch.arange(BLOCKS * TOKENS * HEADS * DIM, dtype=torch.float32).view(BLOCKS, TOKENS, HEADS, DIM)
    handed = memory.permute(0, 2, 1, 3)  # what the CUDA backend registers: not contiguous
    assert not handed.is_contiguous()
    r = rows(handed)
    assert r.shape == (BLOCKS, TOKENS * HEADS * DIM) and r.data_ptr() == memory.data_ptr()
    for b in range(BLOCKS):  # a block's bytes are one contiguous run of the real memory
        assert torch.equal(r[b], memory[b].flatten())
    r[4].zero_()  # a write through the rows lands in the engine's cache (loads inject this way)
    assert not handed[4].any() and handed[5].all()


def _connector(gpu: object = None) -> SimpleNamespace:
    """The connector's worker-side state around one contiguous layer, chunks of 2 blocks."""
    cache = torch.arange(BLOCKS * HEADS * TOKENS * DIM, dtype=torch.float32).view(BLOCKS, HEADS, TOKENS, DIM)
    conn = SimpleNamespace(_num_blocks=BLOCKS, _planner=SimpleNamespace(blocks_per_chunk=2), _gpu=gpu)
    conn._blocks = [rows(cache)]
    conn._chunk_view = lambda payload, n: PDStoreConnector._chunk_view(conn, payload, n)  # type: ignore[arg-type]
    conn._chunk_nbytes = lambda: PDStoreConnector._chunk_nbytes(conn)  # type: ignore[arg-type]
    conn._inject = lambda payload, item: PDStoreConnector._inject(conn, payload, item)  # type: ignore[arg-type]
    return conn


def test_cpu_engines_leave_the_checksum_to_the_client_and_load_verified_payloads() -> None:
    from kvstore.connector_plan import LoadItem, SaveItem

    conn = _connector()
    payload = memoryview(bytearray(PDStoreConnector._chunk_nbytes(conn)))  # type: ignore[arg-type]
    assert PDStoreConnector._extract(conn, SaveItem(b"k" * 16, (1, 2)), payload) is None  # type: ignore[arg-type]

    def verified(keys: list[bytes], locs: list[object], on_chunk: object) -> list[bool]:
        on_chunk(0, payload)  # type: ignore[operator]
        return [True]

    never = lambda *a: pytest.fail("a CPU engine verifies nothing itself")  # noqa: E731
    conn._store = SimpleNamespace(batch_get=verified, batch_get_self_verified=never)
    item = LoadItem(b"k" * 16, None, (4, 5), 0)  # type: ignore[arg-type]
    assert PDStoreConnector._load(conn, [item]) == [True]  # type: ignore[arg-type]
    assert torch.equal(conn._blocks[0][4:6], conn._blocks[0][1:3])


def test_the_cuda_path_verifies_its_own_copy_and_its_verdict_is_the_chunks() -> None:
    from kvstore.connector_plan import LoadItem

    seen: list[tuple[int, tuple[int, ...], int, int]] = []

    def load_checked(payload: memoryview, digest: int, ids: tuple[int, ...], per: int, skip: int) -> bool:
        seen.append((digest, ids, per, skip))
        return digest == 7

    conn = _connector(SimpleNamespace(gpu_checksums=True, load_checked=load_checked))

    def self_verified(keys: list[bytes], locs: list[object], check: object) -> list[bool]:
        return [check(i, memoryview(b""), 7 if i == 0 else 8) for i in range(len(keys))]  # type: ignore[operator]

    never = lambda *a: pytest.fail("the CUDA path must not take host-verified reads")  # noqa: E731
    conn._store = SimpleNamespace(batch_get=never, batch_get_self_verified=self_verified)
    items = [LoadItem(b"a" * 16, None, (3,), 1), LoadItem(b"b" * 16, None, (4, 5), 0)]  # type: ignore[arg-type]
    assert PDStoreConnector._load(conn, items) == [True, False]  # type: ignore[arg-type]
    assert seen == [(7, (3,), 2, 1), (8, (4, 5), 2, 0)]
