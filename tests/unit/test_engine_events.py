"""vLLM KV events read as chunk keys (no engine: batches built as vLLM encodes them)."""

from __future__ import annotations

from typing import Any

import msgpack

from kvstore.hashing import KVNamespace, chunk_keys
from router.index.engine_events import BlockTranslator, decode_batch

NS = KVNamespace("m", "float32", "cpu/bs4", chunk_tokens=8)  # a chunk is two 4-token blocks
IDS = list(range(100, 124))  # 24 tokens: 6 blocks, 3 chunks


def stored(hashes: list[int], parent: int | None, tokens: list[int]) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": 4, "lora_id": None, "medium": "CPU", "lora_name": None}


def test_blocks_stored_across_batches_chain_into_the_stores_keys() -> None:
    t = BlockTranslator(NS)
    want = chunk_keys(NS, IDS)
    first = t.apply([stored([1, 2, 3], None, IDS[:12])])  # 1.5 chunks: one key so far
    assert first.stored == (want[0],)
    rest = t.apply([stored([4, 5, 6], 3, IDS[12:24])])  # continues from block 3's half chunk
    assert rest.stored == (want[1], want[2]) and len(t) == 6


def test_unknown_parent_is_skipped_removed_blocks_remove_their_chunk_and_clear_resets() -> None:
    t = BlockTranslator(NS)
    assert t.apply([stored([9], 777, IDS[:4])]).stored == () and t.unplaced == 1
    t.apply([stored([1, 2, 3, 4], None, IDS[:16])])
    want = chunk_keys(NS, IDS)
    gone = t.apply([{"type": "BlockRemoved", "block_hashes": [4, 3, 404], "medium": "CPU"}])
    assert gone.removed == (want[1],)  # block 4 completed chunk 1; block 3 completed none
    cleared = t.apply([{"type": "AllBlocksCleared"}, stored([1], None, IDS[:4])])
    assert cleared.cleared and cleared.stored == () and len(t) == 1


def test_batches_decode_from_maps_and_from_tagged_arrays() -> None:
    as_maps = msgpack.packb([1.0, [stored([b"\x01" * 32], None, IDS[:4]), {"type": "AllBlocksCleared"}], None])
    as_arrays = msgpack.packb([1.0, [["BlockStored", [b"\x01" * 32], None, IDS[:4], 4, None, "CPU"],
                                     ["BlockRemoved", [b"\x01" * 32], "CPU"]], 0])
    a, b = decode_batch(as_maps), decode_batch(as_arrays)
    assert [e["type"] for e in a] == ["BlockStored", "AllBlocksCleared"] and a[0]["token_ids"] == IDS[:4]
    assert b[0]["parent_block_hash"] is None and b[0]["block_size"] == 4 and b[1]["block_hashes"] == [b"\x01" * 32]
