"""OpenAI response bodies (completions and chat, whole and streamed) from engine deltas."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from kvstore.messages import TokenLogprob
from router.pipeline import Generation

Detok = Callable[[int], str]


def completion_logprobs(lps: Sequence[TokenLogprob], detok: Detok, offset0: int) -> dict[str, Any]:
    tokens = [detok(lp.token_id) for lp in lps]
    offsets, pos = [], offset0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{detok(t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def chat_logprobs(lps: Sequence[TokenLogprob], detok: Detok) -> dict[str, Any]:
    def entry(tid: int, logprob: float) -> dict[str, Any]:
        tok = detok(tid)
        return {"token": tok, "logprob": logprob, "bytes": list(tok.encode())}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in lps
        ]
    }


def usage(n_prompt: int, gen: Generation) -> dict[str, Any]:
    n_out = len(gen.token_ids)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
        "prompt_tokens_details": {"cached_tokens": gen.trace.prefill_cached_tokens},
    }


class ResponseBuilder:
    def __init__(self, kind: str, request_id: str, model: str, n_prompt: int, detok: Detok,
                 want_ids: bool) -> None:
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.n_prompt = n_prompt
        self.detok = detok
        self.want_ids = want_ids
        self._sent_role = False
        self._text_pos = 0

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, lps: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        if lps is None:
            return None
        return chat_logprobs(lps, self.detok) if self.chat else completion_logprobs(lps, self.detok, self._text_pos)

    def full(self, gen: Generation) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(gen.logprobs),
                                  "finish_reason": gen.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": gen.text}
        else:
            choice["text"] = gen.text
        if self.want_ids:
            choice["token_ids"] = list(gen.token_ids)
        body = self._head("chat.completion" if self.chat else "text_completion")
        body.update(choices=[choice], usage=usage(self.n_prompt, gen), pdserve=asdict(gen.trace))
        return body

    def chunk(self, text: str, token_ids: Sequence[int], lps: Sequence[TokenLogprob] | None,
              finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(lps), "finish_reason": finish}
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if not self._sent_role:
                delta["role"] = "assistant"
                self._sent_role = True
            choice["delta"] = delta
        else:
            choice["text"] = text
        if self.want_ids:
            choice["token_ids"] = list(token_ids)
        self._text_pos += len(text)
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = [choice]
        return body

    def usage_chunk(self, gen: Generation) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body.update(choices=[], usage=usage(self.n_prompt, gen), pdserve=asdict(gen.trace))
        return body
