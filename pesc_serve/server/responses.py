"""Builders of OpenAI response objects: completions, chunks, usage, logprobs.

Plain dicts (serialised once with json.dumps): per-chunk pydantic models would cost more
than the token they carry.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pesc_serve.engine.request import FinishReason, RequestOutput, TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_finish_reason(reason: FinishReason | None) -> str | None:
    """Only OpenAI's values leave the server: an abort (timeout) was cut short, like 'length'."""
    if reason is None:
        return None
    if reason in (FinishReason.LENGTH, FinishReason.ABORT):
        return "length"
    return "stop"


class TokenText:
    """Token id -> its text as the client sees it (cached: logprobs ask for the same ids often)."""

    def __init__(self, tokenizer: Any) -> None:
        self._decode = lru_cache(maxsize=65536)(lambda tid: tokenizer.decode([tid]))

    def __call__(self, token_id: int) -> str:
        return self._decode(token_id)


def chat_logprobs(items: list[TokenLogprob], text_of: TokenText) -> list[dict]:
    def entry(tid: int, lp: float) -> dict:
        s = text_of(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return [{**entry(i.token_id, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in items]


@dataclass
class ChoiceState:
    """Accumulated result of one choice (non-streaming responses and usage)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.logprobs)
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason
            self.error = out.error


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_logprobs(items: list[TokenLogprob], text_of: TokenText, start_offset: int) -> dict:
    """The legacy completions ``logprobs`` object."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = start_offset
    for i in items:
        s = text_of(i.token_id)
        tokens.append(s)
        token_lps.append(i.logprob)
        tops.append({text_of(t): lp for t, lp in i.top} if i.top else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chunk_envelope(obj_id: str, obj: str, created: int, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    return {"id": obj_id, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage_}


def now() -> int:
    return int(time.time())
