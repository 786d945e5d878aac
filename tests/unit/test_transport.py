from kvstore.transport.tcp import _ranges


def test_slot_server_merges_neighbouring_slots_into_one_send() -> None:
    # back to back, then a gap, then one out of order: only neighbours in request order merge
    assert _ranges([0, 100, 350, 450, 50], [100, 200, 100, 10, 50]) == [(0, 300), (350, 110), (50, 50)]
    assert _ranges([], []) == []
