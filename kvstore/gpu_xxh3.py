# mypy: allow-untyped-decorators, allow-untyped-calls, disable-error-code="no-untyped-def"
# (Triton kernels: Triton types their arguments when it specialises them)
"""xxh3-64 (seed 0, default secret) of each checksum block of a GPU byte tensor, in Triton.

Bit-exact with ``xxhash.xxh3_64_intdigest`` (``segment.block_digest``) of the same bytes, so
a slot hashed here seals and verifies exactly as one hashed on the CPU. Imported only on
CUDA paths (``kvstore/gpu_path.py``) and by its tests (CPU: ``TRITON_INTERPRET=1``).

xxh3's long-input loop (inputs > 240 B) keeps 8 u64 accumulators ("lanes"). Per 1,024-byte
"kiB-block" (16 stripes of 64 B) every lane gets a SUM of per-stripe terms that depend only
on the data and the secret, then a non-linear scramble:

    stripe s, lane j:  w = data word j (8 B)   k = w ^ secret64[s + j]
                       acc[j] += lo32(k) * hi32(k);   acc[j ^ 1] += w
    after 16 stripes:  acc[j] = (xorshift47(acc[j]) ^ secret[128 + 8j]) * PRIME32_1

Addition commutes, so the work splits in two launches:

  1. ``_stripe_sums``: every kiB-block of the tensor at once (fully parallel, bandwidth
     bound): its 16 stripes' terms summed per lane -> ``sums[kib, 8]``;
  2. ``_chains``: one program per checksum block runs only the scramble chain over its
     kiB-blocks' sums (1,023 steps per MiB per lane, sequential), adds the last partial
     block and the "last stripe" (the final 64 B, keyed at secret + 121), then merges the
     lanes and avalanches. A block of <= 240 B (only a payload's last) takes xxh3's
     short-input formulas in ``_short`` instead.

Lanes are kept as even (0, 2, 4, 6) and odd (1, 3, 5, 7) halves, so "acc[j ^ 1] += w" is
"even += odd words, odd += even words" with no lane shuffle; ``sums`` columns are
[even 0..3 | odd 0..3].

A chunk's checksum (``segment.checksum``) is its blocks' digests folded by one more xxh3-64 of
their bytes: ``chunk_checksums`` does that on the device too (``_fold``, a program per chunk:
8 B per MiB, so the short formulas up to 30 MiB chunks, a one-program long loop above), and
compares with the expected checksums there, so a load's scatter can read the verdicts
without a host round trip.

A stripe of a block of length L at offset o counts in its kiB-block's sum only if
o + 64 < L: with nb = (L - 1) // 1024 scrambled kiB-blocks, the partial block takes
((L - 1) - 1024 nb) // 64 stripes, and the stripe ending exactly at L is the last stripe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstore.segment import CHECK_BLOCK

# The default 192-byte secret (xxHash's kSecret) as the uint8 tensor the kernels read.
_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
KIB_BLOCK = 1024  # xxh3's block of 16 stripes between scrambles (default secret)
SHORT_MAX = 240  # longer inputs take the long loop
ROWS = 64  # stripes per program of _stripe_sums (4 kiB-blocks)
CHAIN_UNROLL = 16  # chain steps whose loads are issued together

P32_1 = tl.constexpr(0x9E3779B1)
P32_2 = tl.constexpr(0x85EBCA77)
P32_3 = tl.constexpr(0xC2B2AE3D)
P64_1 = tl.constexpr(0x9E3779B185EBCA87)
P64_2 = tl.constexpr(0xC2B2AE3D27D4EB4F)
P64_3 = tl.constexpr(0x165667B19E3779F9)
P64_4 = tl.constexpr(0x85EBCA77C2B2AE63)
P64_5 = tl.constexpr(0x27D4EB2F165667C5)
MX1 = tl.constexpr(0x165667919E3779F9)
MX2 = tl.constexpr(0x9FB21C651E98DF25)
M32 = tl.constexpr(0xFFFFFFFF)

assert CHECK_BLOCK % KIB_BLOCK == 0  # a kiB-block never spans two checksum blocks


@triton.jit
def _u64(x):
    return x.to(tl.uint64)


@triton.jit
def _le64_1d(ptr, offs, mask):
    """Little-endian u64 at byte offsets ``offs`` (any alignment) of a uint8 pointer."""
    b = tl.arange(0, 8)
    raw = tl.load(ptr + offs[:, None] + b[None, :], mask=mask[:, None], other=0)
    return tl.sum(_u64(raw) << _u64(b * 8)[None, :], axis=1)


@triton.jit
def _le32_1d(ptr, offs, mask):
    """Little-endian u32 (as u64) at byte offsets ``offs``: reads 4 bytes, never past them."""
    b = tl.arange(0, 4)
    raw = tl.load(ptr + offs[:, None] + b[None, :], mask=mask[:, None], other=0)
    return tl.sum(_u64(raw) << _u64(b * 8)[None, :], axis=1)


@triton.jit
def _le64_2d(ptr, offs, mask):
    b = tl.arange(0, 8)
    raw = tl.load(ptr + offs[:, :, None] + b[None, None, :], mask=mask[:, :, None], other=0)
    return tl.sum(_u64(raw) << _u64(b * 8)[None, None, :], axis=2)


@triton.jit
def _mul128_fold64(a, b):
    """Low XOR high half of the 128-bit product of two u64 (from 32-bit pieces)."""
    a_lo = a & M32
    a_hi = a >> 32
    b_lo = b & M32
    b_hi = b >> 32
    lo_lo = a_lo * b_lo
    cross = (lo_lo >> 32) + ((a_hi * b_lo) & M32) + a_lo * b_hi
    hi = a_hi * b_hi + ((a_hi * b_lo) >> 32) + (cross >> 32)
    lo = (cross << 32) | (lo_lo & M32)
    return lo ^ hi


@triton.jit
def _avalanche(h):
    h = h ^ (h >> 37)
    h = h * MX1
    return h ^ (h >> 32)


@triton.jit
def _four(a: tl.constexpr, b: tl.constexpr, c: tl.constexpr, d: tl.constexpr):
    """[a, b, c, d] as u64 (constants of any width, none narrowed on the way)."""
    i = tl.arange(0, 4)
    out = tl.where(i == 0, tl.full((4,), a, tl.uint64), tl.full((4,), b, tl.uint64))
    out = tl.where(i == 2, tl.full((4,), c, tl.uint64), out)
    return tl.where(i == 3, tl.full((4,), d, tl.uint64), out)


@triton.jit
def _stripe_terms(w_even, w_odd, k_even, k_odd):
    """One stripe's additions to the even and odd lanes (see the module docstring)."""
    d_even = w_even ^ k_even
    d_odd = w_odd ^ k_odd
    return w_odd + (d_even & M32) * (d_even >> 32), w_even + (d_odd & M32) * (d_odd >> 32)


@triton.jit
def _stripe_sums(data, secret, sums, n_bytes, BLOCK: tl.constexpr, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """sums[kib] = per-lane sum of kiB-block kib's counted stripes (ROWS stripes a program);
    WORDS: ``data`` is 8-byte aligned, so its words are loaded as words, not byte by byte
    (the GPU is little-endian, as xxh3 reads them)."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)  # global stripe index
    half = tl.arange(0, 4)
    start = row * 64
    block_end = tl.minimum((start // BLOCK + 1) * BLOCK, n_bytes)
    counted = start + 64 < block_end
    mask = counted[:, None] & (half[None, :] >= 0)
    off_even = start[:, None] + (half * 16)[None, :]
    if WORDS:
        words = data.to(tl.pointer_type(tl.uint64))
        w_even = tl.load(words + off_even // 8, mask=mask, other=0)
        w_odd = tl.load(words + off_even // 8 + 1, mask=mask, other=0)
    else:
        w_even = _le64_2d(data, off_even, mask)
        w_odd = _le64_2d(data, off_even + 8, mask)
    s = (row % 16)[:, None]  # stripe within its kiB-block: secret words s + lane
    key_even = _le64_2d(secret, (s + half[None, :] * 2) * 8, mask)
    key_odd = _le64_2d(secret, (s + half[None, :] * 2 + 1) * 8, mask)
    t_even, t_odd = _stripe_terms(w_even, w_odd, key_even, key_odd)
    t_even = tl.where(mask, t_even, 0)
    t_odd = tl.where(mask, t_odd, 0)
    sum_even = tl.sum(tl.reshape(t_even, (ROWS // 16, 16, 4)), axis=1)
    sum_odd = tl.sum(tl.reshape(t_odd, (ROWS // 16, 16, 4)), axis=1)
    kib = pid * (ROWS // 16) + tl.arange(0, ROWS // 16).to(tl.int64)
    n_kib = tl.cdiv(n_bytes, 1024)
    out = sums + kib[:, None] * 8 + half[None, :]
    ok = (kib < n_kib)[:, None] & (half[None, :] >= 0)
    tl.store(out, sum_even.to(tl.int64, bitcast=True), mask=ok)
    tl.store(out + 4, sum_odd.to(tl.int64, bitcast=True), mask=ok)


@triton.jit
def _scramble(acc, row, key):
    """One kiB-block of the chain: add its stripe sums (loaded from ``row``), scramble."""
    x = acc + tl.load(row).to(tl.uint64, bitcast=True)
    return ((x ^ (x >> 47)) ^ key) * P32_1


@triton.jit
def _chains(data, secret, sums, digests, n_bytes, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """digests[c] = xxh3-64 of checksum block c (> 240 B), from its kiB-blocks' sums."""
    c = tl.program_id(0).to(tl.int64)
    base = c * BLOCK
    length = tl.minimum(BLOCK, n_bytes - base)
    nb = (length - 1) // 1024  # kiB-blocks followed by a scramble
    k0 = base // 1024
    half = tl.arange(0, 4)
    lane_even = half * 2
    one = half >= 0
    acc_even = _four(P32_3, P64_2, P64_4, P64_5)  # xxh3's initial accumulators, even lanes
    acc_odd = _four(P64_1, P64_3, P32_2, P32_1)
    scr_even = _le64_1d(secret, 128 + lane_even * 8, one)
    scr_odd = _le64_1d(secret, 136 + lane_even * 8, one)
    # The chain: loads do not depend on the accumulators, so UNROLL steps' loads can all be
    # in flight at once (straight-line code the compiler schedules loads-first); each step is
    # then four dependent integer ops per lane, no cross-thread work.
    whole = nb - nb % UNROLL
    for n0 in range(0, whole, UNROLL):
        for i in tl.static_range(UNROLL):
            row = sums + (k0 + n0 + i) * 8
            acc_even = _scramble(acc_even, row + half, scr_even)
            acc_odd = _scramble(acc_odd, row + 4 + half, scr_odd)
    for n in range(whole, nb):
        row = sums + (k0 + n) * 8
        acc_even = _scramble(acc_even, row + half, scr_even)
        acc_odd = _scramble(acc_odd, row + 4 + half, scr_odd)
    # the last, partial kiB-block (its counted stripes were summed in _stripe_sums)
    acc_even += tl.load(sums + (k0 + nb) * 8 + half).to(tl.uint64, bitcast=True)
    acc_odd += tl.load(sums + (k0 + nb) * 8 + 4 + half).to(tl.uint64, bitcast=True)
    tl.store(digests + c, _finish(acc_even, acc_odd, data, secret, base, length).to(tl.int64, bitcast=True))


@triton.jit
def _finish(acc_even, acc_odd, data, secret, base, length):
    """The end of the long loop for the ``length`` bytes at ``data + base``, once every
    counted stripe is in the accumulators: the last stripe, the merge, the avalanche."""
    half = tl.arange(0, 4)
    lane_even = half * 2
    one = half >= 0
    # the last stripe: the final 64 bytes, keyed at secret + 192 - 64 - 7
    last = base + length - 64 + lane_even * 8
    key_even = _le64_1d(secret, 121 + lane_even * 8, one)
    key_odd = _le64_1d(secret, 129 + lane_even * 8, one)
    t_even, t_odd = _stripe_terms(_le64_1d(data, last, one), _le64_1d(data, last + 8, one), key_even, key_odd)
    acc_even += t_even
    acc_odd += t_odd
    # merge: sum over pairs (2i, 2i + 1) of mul128_fold64(acc ^ secret at 11 + 8 lane)
    m_even = acc_even ^ _le64_1d(secret, 11 + lane_even * 8, one)
    m_odd = acc_odd ^ _le64_1d(secret, 19 + lane_even * 8, one)
    h = _u64(length) * P64_1 + tl.sum(_mul128_fold64(m_even, m_odd), axis=0)
    return _avalanche(h)


@triton.jit
def _mix16(data, secret, d_off, s_off, mask):
    """xxh3's mix16B (seed 0) at byte offsets ``d_off`` of the data, ``s_off`` of the secret."""
    lo = _le64_1d(data, d_off, mask) ^ _le64_1d(secret, s_off, mask)
    hi = _le64_1d(data, d_off + 8, mask) ^ _le64_1d(secret, s_off + 8, mask)
    return tl.where(mask, _mul128_fold64(lo, hi), 0)


@triton.jit
def _short_hash(p, secret, length, KIND: tl.constexpr):
    """xxh3-64 of ``length`` (1..240) bytes at ``p`` by the formula for KIND 1 (1-3 B), 4
    (4-8), 9 (9-16), 17 (17-128) or 129 (129-240); KIND 1, 4 and 9 leave it in lane 0 of
    an 8-lane vector, 17 and 129 return a scalar."""
    i8 = tl.arange(0, 8).to(tl.int64)
    one = i8 < 1
    n = _u64(length)
    if KIND == 1:
        c1 = _u64(tl.load(p + i8 * 0, mask=one, other=0))
        c2 = _u64(tl.load(p + (length >> 1) + i8 * 0, mask=one, other=0))
        c3 = _u64(tl.load(p + length - 1 + i8 * 0, mask=one, other=0))
        combined = (c1 << 16) | (c2 << 24) | c3 | (n << 8)
        flip = (_le64_1d(secret, i8 * 0, one) ^ _le64_1d(secret, i8 * 0 + 4, one)) & M32
        h = combined ^ flip
        h = (h ^ (h >> 33)) * P64_2
        h = (h ^ (h >> 29)) * P64_3
        h = h ^ (h >> 32)
    elif KIND == 4:
        in1 = _le32_1d(p, i8 * 0, one)
        in2 = _le32_1d(p, i8 * 0 + length - 4, one)
        flip = _le64_1d(secret, i8 * 0 + 8, one) ^ _le64_1d(secret, i8 * 0 + 16, one)
        h = (in2 + (in1 << 32)) ^ flip
        h = h ^ ((h << 49) | (h >> 15)) ^ ((h << 24) | (h >> 40))
        h = h * MX2
        h = h ^ ((h >> 35) + n)
        h = h * MX2
        h = h ^ (h >> 28)
    elif KIND == 9:
        z = i8 * 0
        lo = _le64_1d(p, z, one) ^ _le64_1d(secret, z + 24, one) ^ _le64_1d(secret, z + 32, one)
        hi = _le64_1d(p, z + length - 8, one) ^ _le64_1d(secret, z + 40, one) ^ _le64_1d(secret, z + 48, one)
        swapped = tl.zeros_like(lo)
        for k in tl.static_range(8):  # byte swap
            swapped = swapped | (((lo >> (8 * k)) & 0xFF) << (56 - 8 * k))
        h = _avalanche(n + swapped + hi + _mul128_fold64(lo, hi))
    elif KIND == 17:
        i = i8 // 2  # pairs (16 i, 32 i) and (len - 16 (i + 1), 32 i + 16), for i <= (len - 1) // 32
        front = i8 % 2 == 0
        d_off = tl.where(front, 16 * i, length - 16 * (i + 1))
        s_off = tl.where(front, 32 * i, 32 * i + 16)
        h = _avalanche(n * P64_1 + tl.sum(_mix16(p, secret, d_off, s_off, i <= (length - 1) // 32), axis=0))
    else:
        acc = n * P64_1 + tl.sum(_mix16(p, secret, 16 * i8, 16 * i8, i8 >= 0), axis=0)
        acc = _avalanche(acc)
        rest = 8 + i8  # rounds 8 .. len // 16 - 1, keyed from secret + 3
        acc_end = tl.sum(_mix16(p, secret, 16 * rest, 16 * i8 + 3, rest < length // 16), axis=0)
        acc_end += tl.sum(_mix16(p, secret, i8 * 0 + length - 16, i8 * 0 + 119, one), axis=0)
        h = _avalanche(acc + acc_end)
    return h


# Triton turns an int argument equal to 1 into a compile-time constant (a Python int without
# .to()), and a 1-byte block is a real case: these stay runtime values.
@triton.jit(do_not_specialize=["index", "start", "length"])
def _short(data, secret, digests, index, start, length, KIND: tl.constexpr):
    """digests[index] = xxh3-64 of ``length`` (1..240) bytes at ``start`` (``_short_hash``)."""
    i8 = tl.arange(0, 8).to(tl.int64)
    one = i8 < 1
    h = _short_hash(data + start, secret, length, KIND)
    out = tl.where(one, h, 0)
    tl.store(digests + index + i8, out.to(tl.int64, bitcast=True), mask=one)


@triton.jit
def _kib_terms(p, secret, n_stripes):
    """The even and odd lanes' sums of the first ``n_stripes`` stripes of the kiB-block at
    ``p`` (``_stripe_sums`` for one kiB-block, in one program)."""
    s = tl.arange(0, 16).to(tl.int64)
    half = tl.arange(0, 4)
    mask = (s < n_stripes)[:, None] & (half[None, :] >= 0)
    off_even = (s * 64)[:, None] + (half * 16)[None, :]
    key_even = _le64_2d(secret, (s[:, None] + half[None, :] * 2) * 8, mask)
    key_odd = _le64_2d(secret, (s[:, None] + half[None, :] * 2 + 1) * 8, mask)
    t_even, t_odd = _stripe_terms(_le64_2d(p, off_even, mask), _le64_2d(p, off_even + 8, mask), key_even, key_odd)
    return tl.sum(tl.where(mask, t_even, 0), axis=0), tl.sum(tl.where(mask, t_odd, 0), axis=0)


@triton.jit
def _long_hash(p, secret, length):
    """xxh3-64 of ``length`` (> 240) bytes at ``p`` in one program, kiB-block by kiB-block:
    for inputs of a few KiB (a chunk's digests, 8 B per MiB), where one program is enough."""
    half = tl.arange(0, 4)
    lane_even = half * 2
    one = half >= 0
    acc_even = _four(P32_3, P64_2, P64_4, P64_5)
    acc_odd = _four(P64_1, P64_3, P32_2, P32_1)
    scr_even = _le64_1d(secret, 128 + lane_even * 8, one)
    scr_odd = _le64_1d(secret, 136 + lane_even * 8, one)
    nb = (length - 1) // 1024
    for kb in range(0, nb):
        t_even, t_odd = _kib_terms(p + kb * 1024, secret, 16)
        x_even = acc_even + t_even
        x_odd = acc_odd + t_odd
        acc_even = ((x_even ^ (x_even >> 47)) ^ scr_even) * P32_1
        acc_odd = ((x_odd ^ (x_odd >> 47)) ^ scr_odd) * P32_1
    t_even, t_odd = _kib_terms(p + nb * 1024, secret, ((length - 1) - 1024 * nb) // 64)
    return _finish(acc_even + t_even, acc_odd + t_odd, p, secret, 0, length)


@triton.jit(do_not_specialize=["length"])
def _fold(digests, secret, sums, expected, flags, length, KIND: tl.constexpr, CHECK: tl.constexpr):
    """sums[c] = chunk c's checksum (``segment.fold_digests``): the xxh3-64 of its ``length``
    bytes of block digests (little-endian u64s, as ``struct.pack("<Q")`` lays them out), or
    its one digest itself (KIND 0); with CHECK, flags[c] = whether it equals expected[c]."""
    c = tl.program_id(0).to(tl.int64)
    p = digests + c * length
    i8 = tl.arange(0, 8).to(tl.int64)
    one = i8 < 1
    if KIND == 0:
        h = _le64_1d(p, i8 * 0, one)
    elif KIND == 241:
        h = _long_hash(p, secret, length)
    else:
        h = _short_hash(p, secret, length, KIND)
    h = tl.sum(tl.where(one, h, 0), axis=0)  # lane 0's (or the scalar's) value
    tl.store(sums + c, h.to(tl.int64, bitcast=True))
    if CHECK:
        want = tl.load(expected + c).to(tl.uint64, bitcast=True)
        tl.store(flags + c, (h == want).to(tl.int64))


_secrets: dict[torch.device, torch.Tensor] = {}


def _secret_on(device: torch.device) -> torch.Tensor:
    sec = _secrets.get(device)
    if sec is None:
        sec = _secrets[device] = torch.frombuffer(bytearray(_SECRET), dtype=torch.uint8).to(device)
    return sec


def _short_kind(length: int) -> int:
    for kind, upto in ((1, 3), (4, 8), (9, 16), (17, 128)):
        if length <= upto:
            return kind
    return 129


def block_digests(data: torch.Tensor, block: int = CHECK_BLOCK) -> torch.Tensor:
    """xxh3-64 of each ``block``-byte piece of the flat uint8 tensor ``data`` (the last may be
    shorter), as int64 bit patterns on ``data``'s device; enqueued on the current stream."""
    if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous():
        raise ValueError(f"want a flat contiguous uint8 tensor, got {data.dtype} {tuple(data.shape)}")
    if block % KIB_BLOCK:
        raise ValueError(f"block {block} is not a multiple of {KIB_BLOCK}")
    n = data.numel()
    if n == 0:
        raise ValueError("no bytes to hash")
    secret = _secret_on(data.device)
    n_blocks = -(-n // block)
    digests = torch.empty(n_blocks, dtype=torch.int64, device=data.device)
    tail = n - (n_blocks - 1) * block
    n_long = n_blocks if tail > SHORT_MAX else n_blocks - 1
    if n_long:
        long_bytes = n if n_long == n_blocks else (n_blocks - 1) * block
        n_kib = -(-long_bytes // KIB_BLOCK)
        sums = torch.empty(n_kib, 8, dtype=torch.int64, device=data.device)
        _stripe_sums[(triton.cdiv(n_kib * 16, ROWS),)](data, secret, sums, long_bytes, BLOCK=block, ROWS=ROWS,
                                                       WORDS=data.data_ptr() % 8 == 0)
        _chains[(n_long,)](data, secret, sums, digests, long_bytes, BLOCK=block, UNROLL=CHAIN_UNROLL, num_warps=1)
    if n_long < n_blocks:
        start = (n_blocks - 1) * block
        _short[(1,)](data, secret, digests, n_blocks - 1, start, tail, KIND=_short_kind(tail))
    return digests


def as_unsigned(digests: torch.Tensor) -> list[int]:
    """The digests as Python ints, as ``segment.block_digest`` returns them (synchronises)."""
    return [d & 0xFFFFFFFFFFFFFFFF for d in digests.tolist()]


def chunk_checksums(digests: torch.Tensor, n_chunks: int,
                    expected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each of ``n_chunks`` equal chunks' checksum (``segment.checksum``: ``fold_digests``
    of its blocks' digests) from ``digests`` (``block_digests`` of the chunks back to back,
    chunk c's the c-th ``n_chunks``-th), in one launch on the current stream, as int64 bit
    patterns; with ``expected`` (int64 bit patterns, one per chunk, on the device) also an
    int64 flag per chunk, 1 where the checksum equals it. The chunks' verdicts never need
    the host: a scatter can read the flags where they are."""
    if digests.dtype != torch.int64 or digests.dim() != 1 or digests.numel() % n_chunks:
        raise ValueError(f"want n_chunks x per int64 digests, got {digests.dtype} {tuple(digests.shape)}")
    per = digests.numel() // n_chunks
    length = 8 * per
    kind = 0 if per == 1 else _short_kind(length) if length <= SHORT_MAX else 241
    sums = torch.empty(n_chunks, dtype=torch.int64, device=digests.device)
    flags = None if expected is None else torch.empty(n_chunks, dtype=torch.int64, device=digests.device)
    _fold[(n_chunks,)](digests.view(torch.uint8), _secret_on(digests.device), sums,
                       sums if expected is None else expected, sums if flags is None else flags, length,
                       KIND=kind, CHECK=expected is not None)
    return sums, flags
