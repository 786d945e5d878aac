from collections.abc import AsyncIterator

import pytest

from kvstore.messages import EngineDelta, EngineRequest, SamplingSpec, TokenLogprob
from router.faults import ReplicaLost
from router.pipeline import Generation, Retries, Trace, first_token, rest
from router.policy import RoutingRequest

KEYS = (b"k" * 16,)


async def fake_prefill(req: EngineRequest, hint: RoutingRequest) -> EngineDelta:
    assert req.sampling.max_tokens == 1 and hint.role == "prefill" and hint.chunk_keys == KEYS
    eos = req.token_ids[-1] == 0
    return EngineDelta((7,), "A", finish_reason="stop" if eos else "length", num_cached_tokens=32, replica="p0",
                       engine_s=0.25)


async def fake_decode(req: EngineRequest, hint: RoutingRequest) -> AsyncIterator[EngineDelta]:
    assert req.token_ids[-1] == 7 and hint.role == "decode"
    for i in range(req.sampling.max_tokens):
        last = i == req.sampling.max_tokens - 1
        yield EngineDelta((8 + i,), "b", finish_reason="length" if last else None, num_cached_tokens=32, replica="d0")


async def run(prompt: list[int], max_tokens: int) -> Generation:
    gen = Generation(trace=Trace())
    s = SamplingSpec(max_tokens=max_tokens, temperature=0)
    first = await first_token("r", prompt, s, KEYS, fake_prefill, gen.trace)
    gen.add(first)
    async for d in rest("r", prompt, s, KEYS, first, fake_decode, gen.trace):
        gen.add(d)
    return gen


async def test_first_token_from_prefill_rest_from_decode() -> None:
    gen = await run([1, 2, 3], max_tokens=4)
    assert gen.token_ids == [7, 8, 9, 10] and gen.text == "Abbb" and gen.finish_reason == "length"
    assert gen.trace == Trace("p0", "d0", 32, 32, prefill_engine_s=0.25)


async def test_one_token_or_eos_never_reaches_decode() -> None:
    assert (await run([1, 2, 3], max_tokens=1)).token_ids == [7]
    gen = await run([1, 2, 0], max_tokens=9)
    assert gen.token_ids == [7] and gen.finish_reason == "stop" and gen.trace.decode_replica == ""


def test_messages_roundtrip_msgpack() -> None:
    req = EngineRequest("id", (1, 2), SamplingSpec(5, 0.5, 0.9, 3, ("x",), 2, True))
    assert EngineRequest.decode(req.encode()) == req
    d = EngineDelta((1,), "t", (TokenLogprob(1, -0.5, ((1, -0.5), (2, -1.0))),), "stop", 9, 4, "r", 0.125)
    assert EngineDelta.decode(d.encode()) == d
    h = RoutingRequest("id", "prefill", 64, KEYS)
    assert RoutingRequest.decode(h.encode()) == h


# -- lost replicas: retried or resumed, nothing repeated or missing ----------------------------

FAST = Retries(backoff_s=0.0)


def lost(replica: str) -> ReplicaLost:
    return ReplicaLost(replica, RuntimeError("actor died"))


async def test_a_prefill_lost_is_retried_and_the_client_never_sees_it() -> None:
    calls: list[str] = []

    async def flaky(req: EngineRequest, hint: RoutingRequest) -> EngineDelta:
        calls.append(req.request_id)
        if len(calls) < 3:
            raise lost(f"p{len(calls)}")
        return await fake_prefill(req, hint)

    trace = Trace()
    first = await first_token("r", [1, 2, 3], SamplingSpec(max_tokens=4), KEYS, flaky, trace, FAST)
    assert first.token_ids == (7,) and trace.prefill_retries == 2 and trace.prefill_replica == "p0"
    assert calls == ["r-p", "r-p1", "r-p2"]  # a fresh engine request id per attempt


async def test_prefill_gives_up_after_its_attempts_and_says_why() -> None:
    async def dead(req: EngineRequest, hint: RoutingRequest) -> EngineDelta:
        raise lost("p9")

    with pytest.raises(ReplicaLost, match="p9"):
        await first_token("r", [1], SamplingSpec(max_tokens=4), KEYS, dead, Trace(), Retries(2, 0, 0.0))


async def test_other_prefill_failures_are_not_retried() -> None:
    calls = 0

    async def bad(req: EngineRequest, hint: RoutingRequest) -> EngineDelta:
        nonlocal calls
        calls += 1
        raise ValueError("prompt rejected by the engine")

    with pytest.raises(ValueError):
        await first_token("r", [1], SamplingSpec(max_tokens=4), KEYS, bad, Trace(), FAST)
    assert calls == 1


async def test_a_decode_lost_mid_stream_resumes_from_every_token_sent() -> None:
    """The second decode replica gets prompt + all tokens streamed so far and only the tokens
    still owed; the client's tokens are the uninterrupted stream's, none twice, none missing."""
    seen: list[EngineRequest] = []

    async def breaks_after_3(req: EngineRequest, hint: RoutingRequest) -> AsyncIterator[EngineDelta]:
        seen.append(req)
        start = len(req.token_ids) - 3  # tokens generated before this call (prompt is 3 long)
        for i in range(req.sampling.max_tokens):
            if len(seen) == 1 and i == 3:
                raise lost("d0")
            last = i == req.sampling.max_tokens - 1
            yield EngineDelta((7 + start + i,), "b", finish_reason="length" if last else None,
                              replica=f"d{len(seen) - 1}")

    gen, trace = Generation(trace=Trace()), Trace()
    s = SamplingSpec(max_tokens=8, temperature=0)
    first = await first_token("r", [1, 2, 3], s, KEYS, fake_prefill, trace, FAST)
    gen.add(first)
    async for d in rest("r", [1, 2, 3], s, KEYS, first, breaks_after_3, trace, FAST):
        gen.add(d)
    assert gen.token_ids == list(range(7, 15)) and gen.finish_reason == "length"
    assert trace.decode_resumes == 1 and trace.decode_replica == "d0"
    assert [r.request_id for r in seen] == ["r-d", "r-d1"]
    assert seen[1].token_ids == (1, 2, 3, 7, 8, 9, 10) and seen[1].sampling.max_tokens == 4
    assert seen[1].sampling.temperature == 0


async def test_decode_gives_up_after_its_resumes() -> None:
    async def dead(req: EngineRequest, hint: RoutingRequest) -> AsyncIterator[EngineDelta]:
        raise lost("d0")
        yield EngineDelta((), "")  # an async generator

    s = SamplingSpec(max_tokens=4)
    trace = Trace()
    first = await first_token("r", [1, 2, 3], s, KEYS, fake_prefill, trace, FAST)
    with pytest.raises(ReplicaLost):
        async for _ in rest("r", [1, 2, 3], s, KEYS, first, dead, trace, Retries(3, 2, 0.0)):
            pass
    assert trace.decode_resumes == 2
