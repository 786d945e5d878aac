"""The preamble of the scripts that run the CUDA KV path's batch logic on CPU (in a fresh
interpreter, under Triton's interpreter): CUDA streams and events as no-ops, pinned memory as
plain memory, so every copy and launch is done when it returns."""

CUDA_AS_NO_OPS = """
import contextlib
import torch

class _S:
    def __init__(self, *a, **k): pass
    def wait_stream(self, s): pass
    def wait_event(self, e): pass
    def synchronize(self): pass
    def record(self, s=None): pass
torch.cuda.Stream = _S
torch.cuda.Event = _S
torch.cuda.stream = lambda s: contextlib.nullcontext()
torch.cuda.current_stream = lambda device=None: _S()
_empty = torch.empty
def empty(*a, pin_memory=False, **k): return _empty(*a, **k)
torch.empty = empty
"""
