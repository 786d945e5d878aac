"""Tokenization in the router: the Rust ``tokenizers`` library plus the checkpoint's Jinja
chat template. No torch and no transformers in the control plane: loading
``transformers.AutoTokenizer`` pulls torch in (seconds and hundreds of MB per router).

The router tokenizes exactly as vLLM's OpenAI server does: completions with special tokens
added, chat prompts rendered by the template and tokenized without adding them again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from router.errors import BadRequest


class _TemplateRaise(Exception):
    pass


def _raise(message: str) -> None:
    raise _TemplateRaise(message)


class PromptTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        jinja_file = model_dir / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        self._special = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token")}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(template) if template else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if self._template is None:
            raise BadRequest("this model has no chat template; use /v1/completions")
        try:
            text = self._template.render(
                messages=list(messages), add_generation_prompt=True, **self._special
            )
        except (_TemplateRaise, TemplateError) as e:
            raise BadRequest(f"chat template rejected the messages: {e}", param="messages") from None
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode_token(self, token_id: int) -> str:
        return str(self._tok.decode([token_id], skip_special_tokens=False))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))


def _token_str(value: Any) -> str:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return str(value.get("content", ""))
    return "" if value is None else str(value)
