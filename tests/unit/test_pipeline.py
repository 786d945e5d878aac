from collections.abc import AsyncIterator

from kvstore.messages import EngineDelta, EngineRequest, SamplingSpec, TokenLogprob
from router.pipeline import Generation, Trace, first_token, rest
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
