"""Constrained decoding for ``response_format`` (JSON mode and JSON schemas), on llguidance.

Each constrained request owns a :class:`OutputMatcher`: before a step it says which token
ids may come next (a grammar over the tokenizer's vocabulary), after the step it consumes
the sampled token, and it reports when the JSON value is complete so the engine can stop
the request there.  The masks only forbid tokens; they never draw random numbers, so
seeded sampling stays reproducible.

llguidance compiles the tokenizer once (about 0.2 s for a 49k vocabulary); that happens
on the first constrained request, not at start-up.
"""

from __future__ import annotations

import copy
import json
import threading
from typing import Any

import numpy as np
import torch

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# Compact layout, as OpenAI prints it: `{"a": 1, "b": [2, 3]}`.  Free whitespace lets small
# models loop on newlines until max_tokens; a schema's "x-guidance" key can still override.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists properties and
    does not say otherwise, as llama.cpp's grammars and vLLM's (xgrammar's strict mode) do:
    plain JSON Schema would allow any extra key, and a small model then invents keys until
    max_tokens.  ``additionalProperties: true`` (or a schema) keeps them allowed."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = {k: closed_objects(v) for k, v in value.items()} if isinstance(value, dict) else value
        elif key in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "not", "additionalProperties"):
            out[key] = closed_objects(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_for(schema: dict[str, Any] | None) -> str:
    """The llguidance grammar of a JSON schema (``None``: any JSON object)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(JSON_OBJECT_SCHEMA if schema is None else closed_objects(schema)), defaults=JSON_LAYOUT
    )


def lark_json(schema: dict[str, Any]) -> str:
    """A JSON schema as a Lark ``%json`` term with this module's layout and closed objects, for
    grammars that embed JSON between fixed text."""
    return "%json " + json.dumps({**closed_objects(schema), "x-guidance": JSON_LAYOUT})


def schema_error(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` cannot constrain decoding, or None when it can (checked before queueing)."""
    import llguidance

    try:
        grammar = grammar_for(schema)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return llguidance.LLMatcher.validate_grammar(grammar) or None


class OutputMatcher:
    """One request's grammar state: the next-token mask, token consumption, completion."""

    def __init__(self, matcher: Any, tokenizer_vocab: int) -> None:
        self._matcher = matcher
        self._tokenizer_vocab = tokenizer_vocab

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """Bool ``[vocab_size]``: True where the token may come next.

        Ids beyond the tokenizer's vocabulary (a model's padded embedding rows) are never
        allowed: they have no text, so they cannot be part of JSON.
        """
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[: min(self._tokenizer_vocab, vocab_size)].astype(bool)
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[: bits.shape[0]] = torch.from_numpy(bits)
        return mask

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar rejects it (the request must end)."""
        return bool(self._matcher.consume_token(token_id))

    @property
    def is_terminated(self) -> bool:
        """The value is complete: nothing but EOS may follow."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None


class StructuredOutputFactory:
    """Makes matchers for one tokenizer; the llguidance tokenizer is built once, lazily."""

    def __init__(self, tokenizer: Any, eos_token_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer
        self._eos_token_ids = eos_token_ids
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    def _compiled_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                backend = getattr(self._tokenizer, "backend_tokenizer", None) or getattr(self._tokenizer, "_tokenizer", None)
                if backend is None:
                    raise ValueError("response_format needs a fast (tokenizers-backed) tokenizer")
                backend = copy.copy(backend)
                backend.no_padding()
                backend.no_truncation()
                eos = getattr(self._tokenizer, "eos_token_id", None)
                if eos is None and self._eos_token_ids:
                    eos = self._eos_token_ids[0]
                self._ll_tokenizer = llguidance.LLTokenizer(backend.to_str(), eos_token=eos)
            return self._ll_tokenizer

    def matcher(self, schema: dict[str, Any] | None = None, grammar: str | None = None) -> OutputMatcher:
        """A fresh matcher for a JSON object (``schema`` None), a JSON schema, or a ready
        llguidance ``grammar`` (Lark text, e.g. from :func:`lark_json`)."""
        import llguidance

        tok = self._compiled_tokenizer()
        m = llguidance.LLMatcher(tok, grammar if grammar is not None else grammar_for(schema), log_level=0)
        if m.is_error():
            raise ValueError(f"response_format: {m.get_error()}")
        return OutputMatcher(m, tok.vocab_size)
