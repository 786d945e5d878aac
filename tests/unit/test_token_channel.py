"""The token channel (kvstore.token_channel): decode replica -> router replica over real ZMQ
sockets on loopback, without Ray: batching per event-loop pass, ordering, the end-of-stream
count, the secret, and what happens when either side goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import msgpack
import pytest
import zmq

from kvstore import token_channel
from kvstore.messages import EngineDelta, TokenLogprob
from kvstore.token_channel import InboxAddress, TokenInbox, TokenOutbox, TokensLost


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def collect(stream: token_channel.InboxStream) -> list[bytes]:
    return [raw async for raw in stream]


async def until_raises(stream: token_channel.InboxStream, exc: type[Exception], match: str) -> list[bytes]:
    """What ``stream`` yields before it raises ``exc``."""
    got: list[bytes] = []
    with pytest.raises(exc, match=match):
        async for raw in stream:
            got.append(raw)
    return got


async def stepped(rid: str, n: int, steps: list[asyncio.Event]) -> AsyncGenerator[bytes, None]:
    """A sequence that gets one token per engine step, as a running sequence in vLLM does."""
    for i in range(n):
        await steps[i].wait()
        yield f"{rid}:{i}".encode()


def test_one_message_per_step_carries_every_request_of_that_router() -> None:
    async def main() -> tuple[list[list[bytes]], int, int]:
        inbox, outbox = TokenInbox("127.0.0.1"), TokenOutbox()
        steps = [asyncio.Event() for _ in range(5)]
        rids = [f"r{i}" for i in range(4)]
        streams = [inbox.open(rid) for rid in rids]
        calls = [asyncio.ensure_future(outbox.relay(inbox.address, rid, stepped(rid, 5, steps)))
                 for rid in rids]
        for s, call in zip(streams, calls, strict=True):
            s.settle_with(call)
        readers = [asyncio.ensure_future(collect(s)) for s in streams]
        for ev in steps:  # the engine's steps: every sequence's token wakes in the same pass
            await asyncio.sleep(0.01)
            ev.set()
        got = await asyncio.wait_for(asyncio.gather(*readers), 10)
        inbox.close()
        outbox.close()
        return got, outbox.messages, inbox.messages

    got, sent_messages, received_messages = run(main())
    assert got == [[f"r{i}:{k}".encode() for k in range(5)] for i in range(4)]
    # 4 requests x 5 tokens: one message per step, the last one included, not one per token.
    assert sent_messages == received_messages == 5


def test_the_stream_ends_at_the_count_even_when_the_answer_overtakes_the_deltas() -> None:
    async def main() -> list[bytes]:
        inbox = TokenInbox("127.0.0.1")
        stream = inbox.open("a")
        stream.ended(3)  # the call's answer came first (Ray's road is faster than the socket)
        for i in range(3):
            inbox.deliver([inbox.address.secret, msgpack.packb([["a", f"{i}".encode()]])])
        out = await asyncio.wait_for(collect(stream), 5)
        inbox.close()
        return out

    assert run(main()) == [b"0", b"1", b"2"]


def test_a_reader_that_fell_behind_gets_what_arrived_in_one_batch() -> None:
    async def main() -> list[list[bytes]]:
        inbox = TokenInbox("127.0.0.1")
        stream = inbox.open("a")
        inbox.deliver([inbox.address.secret, msgpack.packb([["a", b"0"]])])
        inbox.deliver([inbox.address.secret, msgpack.packb([["a", b"1"], ["a", b"2"]])])
        got = []
        async for batch in stream.batches():
            got.append(batch)
            if len(got) == 1:  # the reader catches up: one at a time again
                inbox.deliver([inbox.address.secret, msgpack.packb([["a", b"3"]])])
                stream.ended(4)
        inbox.close()
        return got

    assert run(main()) == [[b"0", b"1", b"2"], [b"3"]]


def test_merged_deltas_keep_every_token_in_order_and_the_last_finish() -> None:
    parts = [EngineDelta((5,), "a", (TokenLogprob(5, -0.1),), None, 7, 3, "d-1", 0.1),
             EngineDelta((6, 7), "bc", (TokenLogprob(6, -0.2), TokenLogprob(7, -0.3, ((8, -1.0),))), None, 7, 3,
                         "d-1", 0.2),
             EngineDelta((8,), "d", (TokenLogprob(8, -0.4),), "stop", 7, 3, "d-1", 0.3)]
    merged = EngineDelta.merge(parts)
    assert merged.token_ids == (5, 6, 7, 8) and merged.text == "abcd" and merged.finish_reason == "stop"
    assert [lp.token_id for lp in merged.logprobs or ()] == [5, 6, 7, 8]
    assert merged.logprobs is not None and merged.logprobs[2].top == ((8, -1.0),)
    assert (merged.num_prompt_tokens, merged.num_cached_tokens, merged.replica) == (7, 3, "d-1")
    assert EngineDelta.merge(parts[:1]) is parts[0]
    plain = EngineDelta.merge([EngineDelta((1,), "x"), EngineDelta((2,), "y")])
    assert plain.logprobs is None and plain.token_ids == (1, 2)


def test_deltas_that_never_arrive_break_the_stream_so_the_router_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_channel, "LATE_GRACE_S", 0.2)

    async def main() -> list[bytes]:
        inbox = TokenInbox("127.0.0.1")
        stream = inbox.open("a")
        inbox.deliver([inbox.address.secret, msgpack.packb([["a", b"0"]])])
        stream.ended(2)
        got = await until_raises(stream, TokensLost, "1 of 2 deltas never arrived")
        inbox.close()
        return got

    assert run(main()) == [b"0"]


def test_a_failed_call_raises_after_the_deltas_that_came_before_it() -> None:
    async def main() -> list[bytes]:
        inbox = TokenInbox("127.0.0.1")
        stream = inbox.open("a")

        async def dies() -> int:
            inbox.deliver([inbox.address.secret, msgpack.packb([["a", b"0"], ["a", b"1"]])])
            raise RuntimeError("replica died")

        stream.settle_with(dies())
        got = await until_raises(stream, RuntimeError, "replica died")
        inbox.close()
        return got

    assert run(main()) == [b"0", b"1"]


def test_messages_without_the_secret_and_deltas_of_closed_streams_are_dropped() -> None:
    async def main() -> tuple[list[bytes], TokenInbox]:
        inbox = TokenInbox("127.0.0.1")
        with inbox.open("gone"):
            pass  # cancelled, or resumed elsewhere under another id
        stream = inbox.open("a")
        late = TokenOutbox()
        await late.relay(inbox.address, "gone", aiter_of([b"late"]))
        out = await strangers_then_one_real(inbox, stream, [[b"x" * 16, msgpack.packb([["a", b"forged"]])],
                                                            [b"only one frame"]], b"real")
        late.close()
        inbox.close()
        return out, inbox

    out, inbox = run(main())
    assert out == [b"real"]
    assert inbox.rejected == 2 and inbox.dropped == 1 and inbox.deltas == 1


def test_a_malformed_message_with_the_secret_is_refused_whole_and_the_reader_goes_on() -> None:
    async def main() -> tuple[list[bytes], TokenInbox]:
        inbox = TokenInbox("127.0.0.1")
        stream = inbox.open("a")
        secret = inbox.address.secret
        bad = [[secret, b"\xc1"],  # not msgpack
               [secret, msgpack.packb(7)],  # not a list
               [secret, msgpack.packb([["a", b"ok"], ["a"]])],  # one pair short: none of it goes in
               [secret, msgpack.packb([[["a"], b"x"]])],  # an unhashable request id
               [secret, msgpack.packb([["a", ["not", "bytes"]]])]]  # a delta that is not bytes
        out = await strangers_then_one_real(inbox, stream, bad, b"real")
        inbox.close()
        return out, inbox

    out, inbox = run(main())
    assert out == [b"real"]
    assert inbox.rejected == 5 and inbox.deltas == 1


def test_a_message_over_the_size_limit_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_channel, "MAX_MESSAGE_BYTES", 4096)

    async def main() -> tuple[list[bytes], TokenInbox]:
        inbox = TokenInbox("127.0.0.1")
        stream = inbox.open("a")
        big = [inbox.address.secret, msgpack.packb([["a", b"x" * 8192]])]
        out = await strangers_then_one_real(inbox, stream, [big], b"small")
        inbox.close()
        return out, inbox

    out, inbox = run(main())
    assert out == [b"small"] and inbox.deltas == 1


async def strangers_then_one_real(inbox: TokenInbox, stream: token_channel.InboxStream,
                                  messages: list[list[bytes]], real: bytes) -> list[bytes]:
    """Send ``messages`` from a socket of no outbox, then ``real`` through an outbox: what
    ``stream`` gets."""
    stranger = zmq.Context.instance().socket(zmq.PUSH)
    stranger.connect(inbox.address.endpoint)
    for frames in messages:
        stranger.send_multipart(frames)
    stranger.close(linger=1000)
    await asyncio.sleep(0.2)  # the strangers' messages are in before the real one
    outbox = TokenOutbox()
    await outbox.relay(inbox.address, stream.request_id, aiter_of([real]))
    stream.ended(1)
    try:
        return await asyncio.wait_for(collect(stream), 5)
    finally:
        outbox.close()


async def aiter_of(items: list[bytes]) -> AsyncGenerator[bytes, None]:
    for item in items:
        yield item


def test_a_router_that_stopped_reading_ends_its_requests_and_their_engine_streams(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_channel, "SEND_HWM", 1)
    closed: list[bool] = []

    async def endless() -> AsyncGenerator[bytes, None]:
        try:
            while True:
                yield b"x" * 65536
                await asyncio.sleep(0)
        finally:
            closed.append(True)  # the engine request is aborted here

    async def main() -> None:
        outbox = TokenOutbox()
        # Nothing listens there: ZMQ queues up to the high-water mark, then refuses.
        gone = InboxAddress("tcp://127.0.0.1:9", b"s" * 16)
        with pytest.raises(ConnectionError, match="is gone .1 steps unread"):
            await asyncio.wait_for(outbox.relay(gone, "a", endless()), 10)
        outbox.close()

    run(main())
    assert closed == [True]


def test_a_router_replica_that_died_ends_its_requests_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_channel, "RECONNECT_GRACE_S", 0.3)
    closed: list[int] = []

    async def tokens() -> AsyncGenerator[bytes, None]:
        i = 0
        try:
            while True:
                yield b"%d" % i
                i += 1
                await asyncio.sleep(0.01)  # an engine step
        finally:
            closed.append(i)  # the engine request is aborted here

    async def main() -> list[bytes]:
        inbox, outbox = TokenInbox("127.0.0.1"), TokenOutbox()
        stream = inbox.open("a")
        relay = asyncio.ensure_future(outbox.relay(inbox.address, "a", tokens()))
        got = []
        async for batch in stream.batches():
            got += batch
            if len(got) >= 5:
                break
        inbox.close()  # the router replica's process dies: nothing listens at its port any more
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="is gone .unreachable for 0.3 s"):
            await asyncio.wait_for(relay, 5)
        assert time.monotonic() - t0 < 2
        outbox.close()
        return got

    assert run(main())[:5] == [b"0", b"1", b"2", b"3", b"4"]
    assert len(closed) == 1


def test_the_address_round_trips() -> None:
    a = InboxAddress("tcp://10.0.0.7:4242", bytes(range(16)))
    assert InboxAddress.decode(a.encode()) == a
