"""Incremental detokenization and stop strings that never leak, even split across tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pesc_serve.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint_factory):
    return AutoTokenizer.from_pretrained(str(tiny_checkpoint_factory("llama")))


def _stream(tok, text: str, stop: list[str], include: bool = False) -> tuple[list[str], str | None, str]:
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("Hi.", add_special_tokens=False), stop, include)
    deltas, matched = [], None
    for i in ids:
        matched = d.add_token(i)
        if matched:
            break
        deltas.append(d.pop_delta(False))
    deltas.append(d.pop_delta(True))
    return deltas, matched, d.text


def test_plain_text_roundtrip(tokenizer):
    text = "the quick brown fox jumps over the lazy dog"
    deltas, matched, full = _stream(tokenizer, text, [])
    assert matched is None and "".join(deltas) == full == text


def test_stop_string_split_across_tokens_is_never_sent(tokenizer):
    text = "the quick brown fox jumps over the lazy dog"
    deltas, matched, full = _stream(tokenizer, text, ["fox jumps"])
    assert matched == "fox jumps"
    assert "".join(deltas) == "the quick brown "
    # no delta ever carried a prefix of the stop string that later turned out to be the stop
    assert not any("fox" in d for d in deltas)


def test_false_alarm_prefix_is_released(tokenizer):
    text = "the fox ran, the fox jumps"
    deltas, matched, _ = _stream(tokenizer, text, ["fox jumps"])
    assert matched == "fox jumps"
    assert "".join(deltas) == "the fox ran, the "


def test_include_stop_str_in_output(tokenizer):
    deltas, matched, _ = _stream(tokenizer, "one two three four", ["three"], include=True)
    assert matched == "three" and "".join(deltas) == "one two three"


def test_earliest_of_several_stops_wins(tokenizer):
    deltas, matched, _ = _stream(tokenizer, "alpha beta gamma delta", ["delta", "beta"])
    assert matched == "beta" and "".join(deltas) == "alpha "


def test_unicode_split_across_byte_tokens(tokenizer):
    text = "café 日本語 ok"
    deltas, matched, full = _stream(tokenizer, text, [])
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
