"""Checksums taken while a remote read lands (kvstore.verify): whatever the pieces the
transport receives in, and whether it reports them or not, every slot gets the verdict a
whole-slot check gives."""

from __future__ import annotations

import os
import random

import pytest

from kvstore.segment import CHECK_BLOCK, HEADER_BYTES, check_slot, seal_slot
from kvstore.verify import LandingDigests

SIZES = (0, 1, 100, 70_000, CHECK_BLOCK - 1, CHECK_BLOCK, CHECK_BLOCK + 1, 3 * CHECK_BLOCK + 5)


def _slots(rng: random.Random, payloads: list[int]) -> tuple[bytearray, list[bytes], list[int]]:
    """Sealed slots back to back in one buffer, as a read lands them."""
    buf = bytearray(sum(HEADER_BYTES + n for n in payloads))
    keys, sums, pos = [], [], 0
    for n in payloads:
        buf[pos + HEADER_BYTES : pos + HEADER_BYTES + n] = rng.randbytes(n)
        keys.append(os.urandom(16))
        sums.append(seal_slot(memoryview(buf), pos, keys[-1], n))
        pos += HEADER_BYTES + n
    return buf, keys, sums


def _land(rng: random.Random, buf: bytearray, payloads: list[int], keys: list[bytes], sums: list[int],
          report: float) -> list[str]:
    """Receive ``buf`` in random pieces, reporting a share ``report`` of them as landed, and
    take each slot's verdict as soon as it is complete (as the tcp transport does)."""
    view, total = memoryview(buf), len(buf)
    landing = LandingDigests(keys, payloads, sums)
    ends, start = [], 0
    for n in payloads:
        ends.append((start, start + HEADER_BYTES + n))
        start += HEADER_BYTES + n
    verdicts, pos, slot = [], 0, 0
    while slot < len(ends):
        pos = min(total, pos + rng.choice([1, 63, 4096, CHECK_BLOCK // 3, CHECK_BLOCK, 2 * CHECK_BLOCK]))
        if rng.random() < report:
            landing.landed(view, pos)
        while slot < len(ends) and ends[slot][1] <= pos:
            a, b = ends[slot]
            verdicts.append(landing.verdict(slot, view[a:b]))
            slot += 1
    return verdicts


@pytest.mark.parametrize("report", [0.0, 0.5, 1.0], ids=["never-reported", "some-reported", "all-reported"])
def test_any_split_of_good_slots_verifies_like_a_whole_slot_check(report: float) -> None:
    rng = random.Random(int(report * 10))
    for _ in range(40):
        payloads = [rng.choice(SIZES) for _ in range(rng.randint(1, 4))]
        buf, keys, sums = _slots(rng, payloads)
        start = 0
        for n, key, digest in zip(payloads, keys, sums, strict=True):  # the reference check agrees
            check_slot(memoryview(buf), start, key, n, digest)
            start += HEADER_BYTES + n
        assert _land(rng, buf, payloads, keys, sums, report) == ["ok"] * len(payloads)


@pytest.mark.parametrize("report", [0.0, 1.0], ids=["never-reported", "all-reported"])
def test_a_flipped_byte_fails_only_its_own_slot(report: float) -> None:
    rng = random.Random(7)
    for _ in range(30):
        payloads = [rng.choice(SIZES[1:]) for _ in range(rng.randint(1, 4))]
        buf, keys, sums = _slots(rng, payloads)
        bad = rng.randrange(len(payloads))
        at = sum(HEADER_BYTES + n for n in payloads[:bad]) + HEADER_BYTES + rng.randrange(payloads[bad])
        buf[at] ^= 0x01
        expected = ["ok"] * len(payloads)
        expected[bad] = "checksum_failures"
        assert _land(rng, buf, payloads, keys, sums, report) == expected


def test_a_slot_headed_as_another_chunk_is_a_mismatch() -> None:
    rng = random.Random(3)
    payloads = [CHECK_BLOCK + 10, 500]
    buf, keys, sums = _slots(rng, payloads)
    keys[1] = os.urandom(16)  # the reader expected another chunk at that location
    assert _land(rng, buf, payloads, keys, sums, 1.0) == ["ok", "slot_mismatches"]
