from kvstore.transport.base import slot_spans
from kvstore.transport.tcp import RECV_STEP, TcpTransport, _ranges


def test_slot_server_merges_neighbouring_slots_into_one_send() -> None:
    # back to back, then a gap, then one out of order: only neighbours in request order merge
    assert _ranges([0, 100, 350, 450, 50], [100, 200, 100, 10, 50]) == [(0, 300), (350, 110), (50, 50)]
    assert _ranges([], []) == []


class _Wire:
    """A socket stand-in: serves ``data`` to recv_into, at most ``most`` bytes a call, and
    notes how much each call asked for."""

    def __init__(self, data: bytes, most: int) -> None:
        self.data, self.pos, self.most, self.asked = data, 0, most, []

    def recv_into(self, view: memoryview, n: int) -> int:
        self.asked.append(n)
        k = min(n, self.most, len(self.data) - self.pos, len(view))
        view[:k] = self.data[self.pos : self.pos + k]
        self.pos += k
        return k


def _receive(lengths: list[int], most: int) -> tuple[list[int], list[tuple[int, bytes]], _Wire]:
    data = bytes(i % 251 for i in range(sum(lengths)))
    wire, dest, slots, landed = _Wire(data, most), memoryview(bytearray(len(data))), [], []
    TcpTransport._receive(wire, dest, slot_spans(lengths), lambda j, v: slots.append((j, bytes(v))),  # type: ignore[arg-type]
                          lambda buf, pos: landed.append(pos))
    assert bytes(dest) == data
    spans = slot_spans(lengths)
    assert slots == [(j, data[a:b]) for j, (a, b) in enumerate(spans)]  # every slot, in order, whole
    assert landed == sorted(landed) and landed[-1] == len(data)
    return landed, slots, wire


def test_receives_end_at_slot_ends_within_the_step() -> None:
    small = 64 * 1024 + 64  # a 64 KiB chunk and its header
    landed, _, wire = _receive([small] * 7, most=1 << 30)
    ends = {b for _, b in slot_spans([small] * 7)}
    assert all(pos in ends for pos in landed)  # a hashing reader never gets half a block
    assert max(wire.asked) <= RECV_STEP and len(wire.asked) == 4  # as many slots a receive as fit


def test_receives_of_large_slots_take_the_step_and_short_reads_lose_nothing() -> None:
    big = 3 * RECV_STEP + 100
    _landed, _, wire = _receive([big, 500, big], most=1 << 30)
    assert max(wire.asked) == RECV_STEP
    _receive([big, 500, 70_000, big], most=1000)  # the kernel returning less than asked
