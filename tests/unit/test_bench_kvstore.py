"""bench.kvstore --pin: a cross-node method's reader runs on its own CPU while it is timed,
every thread of it, and gets its CPUs back after."""

from __future__ import annotations

import os
import threading

import pytest

from bench.kvstore.__main__ import _reader_on


def test_reader_on_pins_every_thread_of_the_process_and_restores_them() -> None:
    everywhere = os.sched_getaffinity(0)
    if len(everywhere) < 2:
        pytest.skip("needs two CPUs")
    cpu = max(everywhere)
    go, seen = threading.Event(), {}

    def helper() -> None:  # a thread that exists before the pin (as the client's verifier does)
        go.wait(10)
        seen["inside"] = os.sched_getaffinity(0)

    t = threading.Thread(target=helper)
    t.start()
    with _reader_on({cpu}):
        assert os.sched_getaffinity(0) == {cpu}
        go.set()
        t.join(10)
    assert seen["inside"] == {cpu}
    assert os.sched_getaffinity(0) == everywhere
    started, seen_after = threading.Event(), {}

    def late() -> None:  # started inside the block: gets the usual CPUs back too
        started.set()
        go.wait(10)
        seen_after["mask"] = os.sched_getaffinity(0)

    go.clear()
    with _reader_on({cpu}):
        t2 = threading.Thread(target=late)
        t2.start()
        started.wait(10)
    go.set()
    t2.join(10)
    assert seen_after["mask"] == everywhere
    with _reader_on(None):  # not a cross-node method: left as it is
        assert os.sched_getaffinity(0) == everywhere
