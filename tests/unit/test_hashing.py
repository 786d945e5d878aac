import pytest

from kvstore.hashing import KVNamespace, chunk_keys, next_key

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
