"""kvstore.gpu_staging.CopyRows: the KV gather/scatter kernel compiled once per kind of
arguments through ``JITFunction.run``, then launched through the compiled kernel's own
launcher on the given stream. Triton is stood in for here (no GPU); tests/gpu and
bench/gpu/kvpath.py run the real launcher on the H200 and check the bytes it moves."""

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvstore import gpu_staging
from kvstore.gpu_staging import _ROW_TILE, CopyRows


class FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, refuse: bool = False) -> None:
        self.runs: list[tuple[Any, ...]] = []
        self.refuse = refuse

    def run(self, *args: Any) -> None:
        if self.refuse:
            raise TypeError("function takes exactly 22 arguments (21 given)")
        self.runs.append(args)


class FakeJit:
    """``_copy_rows``: ``kernel[grid](*args, **constexprs)`` compiles a kernel per call here."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[tuple[tuple[int, int], tuple[Any, ...], dict[str, Any]]] = []
        self.compiled: list[FakeCompiled] = []
        self.refuse = refuse

    def __getitem__(self, grid: tuple[int, int]) -> Any:
        def launch(*args: Any, **kw: Any) -> FakeCompiled:
            self.calls.append((grid, args, kw))
            self.compiled.append(FakeCompiled(self.refuse))
            return self.compiled[-1]
        return launch


@pytest.fixture
def jit(monkeypatch: pytest.MonkeyPatch) -> FakeJit:
    fake = FakeJit()
    monkeypatch.setattr(gpu_staging, "_copy_rows", fake)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PDSERVE_TRITON_JIT_LAUNCH", raising=False)
    return fake


STREAM = SimpleNamespace(cuda_stream=0xC0FFEE)


def args(n_ids: int = 32, staging: torch.Tensor | None = None) -> tuple[Any, ...]:
    t = torch.zeros(64, dtype=torch.int64)
    return (t[:4], t[4:8], t[8:8 + n_ids], t[40:40 + n_ids], torch.zeros(256, dtype=torch.int64) if staging is None
            else staging, n_ids, 8, 512, t[8:8 + n_ids], 128)


def launch(rows: CopyRows, a: tuple[Any, ...], to_staging: bool = True) -> None:
    rows(STREAM, (16 * a[5], 1), *a, to_staging, False)


def test_a_kind_of_arguments_compiles_once_then_goes_through_its_launcher_on_the_stream(jit: FakeJit) -> None:
    rows = CopyRows()
    a = args()
    launch(rows, a)
    assert len(jit.calls) == 1 and jit.calls[0][2] == {"TO_STAGING": True, "TILE": _ROW_TILE, "FLAGGED": False}
    launch(rows, a)
    launch(rows, args())  # other tensors, the same kind
    assert len(jit.calls) == 1 and rows.launches == {"direct": 2, "jit": 1}
    run = jit.compiled[0].runs[0]
    assert run[:9] == (16 * 32, 1, 1, 0xC0FFEE, "fn", "meta", None, None, None)
    assert run[9:19] == a and run[19:] == (True, _ROW_TILE, False)  # every parameter, constexprs in order


@pytest.mark.parametrize("change", ["an id count of 1", "an id count off a multiple of 16", "unaligned staging",
                                    "the other direction"])
def test_what_triton_specialises_on_picks_another_kernel(jit: FakeJit, change: str) -> None:
    rows = CopyRows()
    launch(rows, args())
    if change == "an id count of 1":
        launch(rows, args(n_ids=1))
    elif change == "an id count off a multiple of 16":
        launch(rows, args(n_ids=24))
    elif change == "unaligned staging":
        launch(rows, args(staging=torch.zeros(258, dtype=torch.int64)[1:]))
    else:
        launch(rows, args(), to_staging=False)
    assert len(jit.calls) == 2 and rows.launches == {"direct": 0, "jit": 2}


def test_a_launcher_that_refuses_its_arguments_sends_every_launch_through_jit(jit: FakeJit,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    jit.refuse = True
    rows = CopyRows()
    launch(rows, args())
    launch(rows, args())  # refused before anything was queued: launched through JITFunction.run instead
    launch(rows, args())
    assert not rows.direct and len(jit.calls) == 3 and rows.launches == {"direct": 0, "jit": 3}
    assert "compiled launcher takes other arguments" in caplog.text


@pytest.mark.parametrize("env", ["TRITON_INTERPRET", "PDSERVE_TRITON_JIT_LAUNCH"])
def test_the_interpreter_and_the_switch_keep_every_launch_on_jit(jit: FakeJit, monkeypatch: pytest.MonkeyPatch,
                                                                 env: str) -> None:
    monkeypatch.setenv(env, "1")
    rows = CopyRows()
    for _ in range(3):
        launch(rows, args())
    assert len(jit.calls) == 3 and rows.launches == {"direct": 0, "jit": 3}
