"""Builders of OpenAI response objects: completions, chunks, usage, logprobs.

Plain dicts (serialised once with json.dumps): per-chunk pydantic models would cost more
than the token they carry.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pesc_serve.engine.request import FinishReason, RequestOutput, TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_finish_reason(reason: FinishReason | None) -> str | None:
    """The wire value: OpenAI's ``stop``/``length``, and vLLM's ``abort`` for an answer cut short by
    the server (shutdown drain over, request timeout): a client must tell it from a complete one."""
    if reason is None:
        return None
    if reason == FinishReason.ERROR:  # errors travel as error objects; this only labels what came before
        return "abort"
    return reason.value


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted (byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_LEVEL = _byte_level_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Token id -> (text, bytes) as the client sees it; cached, logprobs repeat ids often.

    A token holding part of a UTF-8 character has no text of its own; like OpenAI we show
    it as ``bytes:\\xNN`` and give its real bytes.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cached = lru_cache(maxsize=65536)(self._compute)

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if all(ch in _BYTE_LEVEL for ch in piece):
            return bytes(_BYTE_LEVEL[ch] for ch in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    def _compute(self, token_id: int) -> tuple[str, bytes]:
        text = self.tokenizer.decode([token_id])
        if "\ufffd" not in text:
            return text, text.encode("utf-8")
        raw = self._raw_bytes(token_id)
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    def __call__(self, token_id: int) -> str:
        return self._cached(token_id)[0]

    def bytes_of(self, token_id: int) -> bytes:
        return self._cached(token_id)[1]


def chat_logprobs(items: list[TokenLogprob], text_of: TokenText) -> list[dict]:
    def entry(tid: int, lp: float) -> dict:
        return {"token": text_of(tid), "logprob": lp, "bytes": list(text_of.bytes_of(tid))}

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
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
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


def text_length(token_text: str) -> int:
    """How far a token moves ``text_offset``: a partial UTF-8 character (``bytes:...``) adds no text."""
    return 0 if token_text.startswith("bytes:") else len(token_text)


def completion_logprobs(items: list[TokenLogprob], text_of: TokenText, start_offset: int) -> dict:
    """The legacy completions ``logprobs`` object; a stream passes the offset its earlier chunks reached."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = start_offset
    for i in items:
        s = text_of(i.token_id)
        tokens.append(s)
        token_lps.append(i.logprob)
        tops.append({text_of(t): lp for t, lp in i.top} if i.top else None)
        offsets.append(offset)
        offset += text_length(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(prompt_ids: list[int], scores: list[TokenLogprob | None], text_of: TokenText) -> dict:
    """The prompt part of a legacy ``logprobs`` object under ``echo``: the first token, with no
    context, has a null logprob, as OpenAI's and vLLM's have."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for token, score in zip(prompt_ids, scores):
        s = text_of(token)
        tokens.append(s)
        token_lps.append(None if score is None else score.logprob)
        tops.append({text_of(t): lp for t, lp in score.top} if score is not None and score.top else None)
        offsets.append(offset)
        offset += text_length(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def joined_logprobs(first: dict, second: dict) -> dict:
    return {k: first[k] + second[k] for k in first}


def prompt_logprobs_body(scores: list[TokenLogprob | None] | None, text_of: TokenText) -> list | None:
    """vLLM's ``prompt_logprobs``: per prompt token, null for the first, else
    ``{token id: {logprob, rank, decoded_token}}`` for the token itself and its top alternatives."""
    if scores is None:
        return None
    out: list[dict | None] = []
    for score in scores:
        if score is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": text_of(t)} for r, (t, lp) in enumerate(score.top)}
        entry[str(score.token_id)] = {"logprob": score.logprob, "rank": score.rank, "decoded_token": text_of(score.token_id)}
        out.append(entry)
    return out


def chunk_envelope(obj_id: str, obj: str, created: int, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    return {"id": obj_id, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage_}


def now() -> int:
    return int(time.time())
