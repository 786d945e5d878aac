"""The layer-wise save on the GPU, without an engine: exactly the whole-chunk save's bytes and
checksums through real CUDA streams and pitched copies (tests/gpu/layerwise_check.py; the
same check runs on CPU under Triton's interpreter in tests/unit/test_gpu_layerwise.py). The
engine's own use of it is asserted in test_disaggregated_gpu.py (``saved_chunks_layerwise``)."""

from __future__ import annotations

import pytest

from tests.gpu.device import DEVICE, SKIP_REASON

if DEVICE is None or DEVICE.name != "cuda":
    pytest.skip(SKIP_REASON if DEVICE is None else "a CUDA check", allow_module_level=True)


@pytest.mark.parametrize("shape", [dict(), dict(layers=16, per=4, n_chunks=16, row_elems=8192)],
                         ids=["small", "1b-shape-4mib-chunks"])
def test_layer_by_layer_gives_the_whole_chunk_saves_bytes_and_checksums(shape: dict) -> None:
    from tests.gpu.layerwise_check import check

    check("cuda", **shape)
