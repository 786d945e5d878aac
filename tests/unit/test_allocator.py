import random

import pytest

from kvstore.allocator import ALIGN, OutOfSpace, SlotAllocator


def test_allocations_are_aligned_and_disjoint() -> None:
    a = SlotAllocator(1 << 16)
    slots = [a.allocate(n) for n in (1, 100, 64, 1000)]
    spans = sorted((s.offset, s.offset + max(s.length, 1)) for s in slots)
    assert all(s.offset % ALIGN == 0 for s in slots)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))


def test_full_segment_raises_and_free_makes_room() -> None:
    a = SlotAllocator(4 * ALIGN)
    slots = [a.allocate(ALIGN) for _ in range(4)]
    with pytest.raises(OutOfSpace):
        a.allocate(1)
    a.free(slots[1].offset)
    assert a.allocate(ALIGN).offset == slots[1].offset


def test_free_coalesces_neighbours() -> None:
    a = SlotAllocator(4 * ALIGN)
    s = [a.allocate(ALIGN) for _ in range(4)]
    for i in (0, 2, 1, 3):
        a.free(s[i].offset)
    assert a.allocate(4 * ALIGN).offset == 0  # one run again


def test_random_churn_never_overlaps_and_accounts_exactly() -> None:
    rng = random.Random(7)
    a = SlotAllocator(1 << 20)
    live: dict[int, int] = {}
    for _ in range(2000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            a.free(off)
            del live[off]
        else:
            n = rng.randint(1, 20000)
            try:
                s = a.allocate(n)
            except OutOfSpace:
                continue
            live[s.offset] = n
    spans = sorted((o, o + n) for o, n in live.items())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
    assert a.used_bytes == sum((n + ALIGN - 1) // ALIGN * ALIGN for n in live.values())


def test_double_free_and_bad_sizes_are_errors() -> None:
    a = SlotAllocator(1024)
    s = a.allocate(10)
    a.free(s.offset)
    with pytest.raises(KeyError):
        a.free(s.offset)
    with pytest.raises(ValueError):
        a.allocate(0)
    with pytest.raises(ValueError):
        SlotAllocator(10)
