"""vLLM's ``ExampleConnector`` with one fix, so Ray Serve LLM's P/D app survives short prompts.

The stock connector claims ``align_to_block_size(len(prompt) - 1) - num_computed_tokens``
tokens, and ``align_to_block_size(n) = (n - 1) // block_size * block_size``. For a prompt of
fewer than ``block_size + 2`` tokens that is negative (-32 for "Hello"); it is negative too
when the engine's own prefix cache already covers more than the aligned length. The scheduler
takes the negative count as given and the worker dies indexing token -32
(``IndexError: index out of range in self`` in ``_prepare_inputs``), taking the replica with
it. Claiming nothing in those cases (the engine computes the prompt itself) is all this
changes; every other byte path is the stock connector's.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector


class SafeExampleConnector(ExampleConnector):
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        n, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        return (max(0, n) if n is not None else n), load_async
