"""``pdserve bench`` against a small OpenAI-compatible streaming server of the test's own
(the server is not the subject: what the load generator sends, when, and what it reports).
Against the real cluster: tests/e2e (``vllm bench serve``) and bench/results."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bench.load.__main__ import main as bench_main
from bench.load.driver import Pacing, run_sessions
from bench.load.workloads import Shape, multiturn_workload, poisson_arrivals
from cluster.runtime import free_port, wait_until

MODEL = "echo-model"


class EchoServer:
    """Streams ``max_tokens`` tokens, one per chunk, 5 ms apart; the tokens depend on the
    prompt, so a history that lost an answer would show. Keeps every prompt it got."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        app = Starlette(routes=[Route("/v1/completions", self.complete, methods=["POST"]),
                                Route("/v1/models", self.models)])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        wait_until(lambda: self.server.started, 30, "the echo server")

    @staticmethod
    def answer(prompt: list[int], n: int) -> list[int]:
        return [5000 + (sum(prompt) + i) % 97 for i in range(n)]

    async def models(self, _: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def complete(self, request: Request) -> StreamingResponse:
        body = await request.json()
        prompt = list(body["prompt"])
        self.prompts.append(prompt)

        async def stream() -> AsyncIterator[str]:
            for tid in self.answer(prompt, int(body["max_tokens"])):
                await asyncio.sleep(0.005)
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": " w", "token_ids": [tid]}]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.server.should_exit = True


VOCAB = list(range(1000, 1300))


def test_open_loop_turns_resend_the_history_with_each_answer(echo: EchoServer) -> None:
    sessions = poisson_arrivals(multiturn_workload(VOCAB, Shape(requests=4, input_len=8, output_len=3,
                                                                system_len=16, turns=3), seed=2), rate=20, seed=2)
    sent, wall = asyncio.run(run_sessions(f"http://127.0.0.1:{echo.port}/v1", MODEL, sessions, Pacing(True)))
    assert len(sent) == 12 and all(s.result.ok for s in sent)
    for s in sent:
        assert s.sent_s >= sessions[s.session].arrival_s - 1e-3  # nothing before its arrival
    for i, session in enumerate(sessions):
        mine = sorted((s for s in sent if s.session == i), key=lambda s: s.turn)
        history: list[int] = []
        for s, turn in zip(mine, session.turns, strict=True):
            history += turn.new_tokens
            assert s.result.prompt_tokens == len(history)
            assert history in echo.prompts
            history += EchoServer.answer(history, turn.max_tokens)  # the answer becomes history
    assert wall >= sessions[-1].arrival_s


def test_pdserve_bench_writes_every_figure_and_request(echo: EchoServer, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    t0 = time.monotonic()
    code = bench_main(["--url", f"http://127.0.0.1:{echo.port}/v1", "--workload", "shared_prefix",
                       "--requests", "6", "--input-len", "8", "--output-len", "4", "--system-len", "32",
                       "--rate", "10,40", "--slo", "chat,code", "--out", str(out)])
    assert code == 0 and time.monotonic() - t0 < 60
    report = json.loads(out.read_text())
    assert report["model"] == MODEL and list(report["runs"]) == ["rate 10/s", "rate 40/s"]
    for run in report["runs"].values():
        assert run["requests"] == 6 and run["failed"] == 0 and run["output_tokens"] == 24
        assert run["ttft_p50_s"] > 0 and run["tpot_p99_s"] > 0 and run["itl_p90_s"] > 0
        assert set(run["goodput"]) == {"chat", "code"} and run["goodput"]["chat"]["met"] == 6
        assert len(run["records"]) == 6
    assert "| rate 40/s |" in report["table"]
    # Beside the JSON: latency CDFs, and goodput against the offered rate (two rates here).
    assert [Path(p).name for p in report["plots"]] == ["bench-latency-cdf.png", "bench-goodput-vs-rate.png"]
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in report["plots"])
