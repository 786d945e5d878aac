"""The connector's view of an engine's KV cache as rows of whole blocks, for every layout the
engines hand it: contiguous (vLLM's CPU backend), split K/V, and the permuted view CUDA
FlashAttention gives (vLLM 0.26: logical [blocks, heads, tokens, 2*head] over memory
[blocks, tokens, heads, 2*head]). Row b must be exactly block b's bytes in memory."""

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
