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
    conn = SimpleNamespace(_num_blocks=BLOCKS, _planner=SimpleNamespace(blocks_per_chunk=2), _gpu=gpu,
                           _tier=None, _tier_reader=None)
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


def test_the_cuda_path_verifies_its_own_copies_at_once_and_takes_other_nodes_chunks_verified() -> None:
    """All of a request's slots on this node go to ONE ``load_many`` (its verdicts are the
    chunks'); a chunk from another node, verified by the client as it landed, is injected
    as it is, not hashed again on the GPU."""
    from kvstore.connector_plan import LoadItem

    seen: list[tuple[list[int], list[tuple[tuple[int, ...], int]], int]] = []
    injected: list[tuple[tuple[int, ...], int, int]] = []

    def load_many(payloads: list[memoryview], digests: list[int], targets: list[tuple[tuple[int, ...], int]],
                  per: int) -> list[bool]:
        seen.append((list(digests), list(targets), per))
        return [d == 7 for d in digests]

    def inject(payload: memoryview, ids: tuple[int, ...], per: int, skip: int) -> None:
        injected.append((ids, per, skip))

    conn = _connector(SimpleNamespace(gpu_checksums=True, load_many=load_many, inject=inject))
    chunk = memoryview(bytearray(PDStoreConnector._chunk_nbytes(conn)))  # type: ignore[arg-type]

    def self_verified(keys: list[bytes], locs: list[object], check: object, on_chunk: object) -> list[bool]:
        on_chunk(2, chunk)  # type: ignore[operator]  # chunk 2 is on another node
        verdicts = check([0, 1], [memoryview(b""), memoryview(b"")], [7, 8])  # type: ignore[operator]
        return [*verdicts, True]

    never = lambda *a: pytest.fail("the CUDA path must not take host-verified reads of its own node")  # noqa: E731
    conn._store = SimpleNamespace(batch_get=never, batch_get_self_verified=self_verified)
    items = [LoadItem(b"a" * 16, None, (3,), 1), LoadItem(b"b" * 16, None, (4, 5), 0),  # type: ignore[arg-type]
             LoadItem(b"c" * 16, None, (0, 1), 0)]  # type: ignore[arg-type]
    assert PDStoreConnector._load(conn, items) == [True, False, True]  # type: ignore[arg-type]
    assert seen == [([7, 8], [((3,), 1), ((4, 5), 0)], 2)]
    assert injected == [((0, 1), 2, 0)]


def test_a_save_hands_every_placed_chunk_to_one_extract() -> None:
    """CPU engines extract chunk by chunk and leave the checksums to the client; the CUDA
    path gets all the chunks the store placed (maybe fewer than asked) in one call."""
    from kvstore.connector_plan import SaveItem

    items = [SaveItem(b"a" * 16, (0, 1)), SaveItem(b"b" * 16, (2, 3)), SaveItem(b"c" * 16, (4, 5))]
    conn = _connector()
    conn._extract = lambda item, payload: PDStoreConnector._extract(conn, item, payload)  # type: ignore[arg-type]
    n = PDStoreConnector._chunk_nbytes(conn)  # type: ignore[arg-type]
    payloads = [memoryview(bytearray(n)) for _ in range(2)]
    assert PDStoreConnector._extract_all(conn, items, payloads) == [None, None]  # type: ignore[arg-type]
    assert bytes(payloads[1]) == conn._blocks[0][2:4].numpy().tobytes()
    calls: list[list[tuple[int, ...]]] = []

    def extract_many(ids: list[tuple[int, ...]], got: list[memoryview]) -> list[int]:
        calls.append(list(ids))
        return [11] * len(got)

    conn = _connector(SimpleNamespace(extract_many=extract_many))
    assert PDStoreConnector._extract_all(conn, items, payloads) == [11, 11]  # type: ignore[arg-type]
    assert calls == [[(0, 1), (2, 3)]]


def test_permuted_split_kv_cache_rows_are_whole_blocks() -> None:
    """A permuted view whose block dimension is not the outermost (split K/V, [2, blocks,
    heads, tokens, dim] over memory [2, blocks, tokens, heads, dim]): row b holds block b's K
    run then its V run (in that order when flattened), and a write through a row lands in
    the cache."""
    memory = torch.arange(2 * BLOCKS * TOKENS * HEADS * DIM, dtype=torch.float32).view(2, BLOCKS, TOKENS, HEADS, DIM)
    handed = memory.permute(0, 1, 3, 2, 4)
    assert not handed.is_contiguous()
    r = rows(handed)
    assert r.shape[0] == BLOCKS and r[0].numel() == 2 * TOKENS * HEADS * DIM
    for b in range(BLOCKS):
        assert torch.equal(r[b].flatten(), torch.cat([memory[0, b].flatten(), memory[1, b].flatten()]))
    assert not r[0].is_contiguous()  # two runs: the CUDA path's one-launch gather declines it
    r[1].zero_()
    assert not handed[:, 1].any() and handed[:, 2].all()


def test_bf16_flash_attention_cache_gives_the_gpu_path_word_runs() -> None:
    """What the one-launch gather needs of a row (kvstore/gpu_path.py ``_fused_copies_work``)
    holds for the CUDA layout: each row one contiguous run, rows a whole number of 8-byte
    words apart, starting at the block's own memory."""
    memory = torch.zeros(BLOCKS, TOKENS, HEADS, 2 * DIM, dtype=torch.bfloat16)
    r = rows(memory.permute(0, 2, 1, 3))
    assert r[0].is_contiguous() and (r.stride(0) * r.element_size()) % 8 == 0
    assert r.stride(0) * r.element_size() == TOKENS * HEADS * 2 * DIM * 2
    assert r[3].data_ptr() == memory[3].data_ptr()
