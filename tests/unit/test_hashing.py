import pytest

from kvstore.hashing import KEY_BYTES, KVNamespace, chunk_keys, next_key, rank_key, rank_keys

NS = KVNamespace(model="m", dtype="float32", layout="cpu/bs32", chunk_tokens=4)


def test_only_full_chunks_get_keys() -> None:
    assert chunk_keys(NS, [1, 2, 3]) == []
    assert len(chunk_keys(NS, list(range(9)))) == 2


def test_keys_chain_the_whole_prefix() -> None:
    a = chunk_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8])
    b = chunk_keys(NS, [9, 2, 3, 4, 5, 6, 7, 8])
    assert a[0] != b[0]
    assert a[1] != b[1]  # same second chunk, different prefix -> different key


def test_shared_prefix_shares_keys_and_input_type_does_not_matter() -> None:
    a = chunk_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = chunk_keys(NS, (1, 2, 3, 4, 5, 6, 7, 8, 100, 101))
    assert a == b and len(a) == 2


@pytest.mark.parametrize("field,value", [("model", "x"), ("dtype", "bfloat16"), ("layout", "cuda/bs16"),
                                         ("tp_rank", 1), ("chunk_tokens", 8)])
def test_namespace_separates_key_spaces(field: str, value: object) -> None:
    other = KVNamespace(**{**NS.__dict__, field: value})
    ids = list(range(16))
    assert not set(chunk_keys(NS, ids)) & set(chunk_keys(other, ids))


def test_bad_namespace_is_rejected() -> None:
    with pytest.raises(ValueError):
        KVNamespace("m", "f", "l", chunk_tokens=0)
    with pytest.raises(ValueError):
        KVNamespace("m", "f", "l", tp_rank=-1)


def test_next_key_walks_the_same_chain() -> None:
    ns = KVNamespace("m", "float32", "cpu/bs32", chunk_tokens=4)
    ids = list(range(13))
    keys, parent = [], None
    for i in range(3):
        parent = next_key(ns, parent, ids[4 * i : 4 * i + 4])
        keys.append(parent)
    assert keys == chunk_keys(ns, ids)
    with pytest.raises(ValueError):
        next_key(ns, None, [1, 2, 3])


def test_tp1_keys_are_pinned() -> None:
    # Stored chunks and the router's index outlive a release: a key must never change.
    assert [k.hex() for k in chunk_keys(NS, list(range(9)))] == [
        "ae370de97d0a31309d4c5c8b20b2cb4d", "eb3c82dc2719b7598f6d737b13512331"]


def test_rank_zero_keeps_the_chain_key_and_other_ranks_get_their_own() -> None:
    keys = chunk_keys(NS, list(range(12)))
    assert [rank_key(k, 0, 4) for k in keys] == keys  # rank 0 of any TP size: the chunk's identity
    shards = rank_keys(keys, 4)
    assert shards[0] == keys and all(len(k) == KEY_BYTES for ks in shards for k in ks)
    assert shards[2] == [rank_key(k, 2, 4) for k in keys]
    assert len({k for ks in shards for k in ks}) == 4 * len(keys)  # no two shards share a key
    assert rank_keys(keys, 1) == [keys]


def test_a_rank_index_of_another_tp_size_is_another_shard() -> None:
    # With replicated KV heads, rank 1 of TP=2 and of TP=4 hold different heads of one size.
    key = chunk_keys(NS, [1, 2, 3, 4])[0]
    assert rank_key(key, 1, 2) != rank_key(key, 1, 4)


def test_rank_outside_the_engine_is_rejected() -> None:
    key = chunk_keys(NS, [1, 2, 3, 4])[0]
    for rank, size in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            rank_key(key, rank, size)
