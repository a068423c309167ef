"""Chat prompts: the tokenizer's own template, else the Camelidae training format."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pesc_serve.server.chat import ChatFormatter, camelidae_prompt
from pesc_serve.server.protocol import ChatMessage


def _msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c) for r, c in pairs]


def test_camelidae_format_matches_its_training_prompt():
    assert camelidae_prompt([{"role": "user", "content": "Hi?"}], "</s>") == "### Human:\nHi?\n### Assistant:\n"
    multi = camelidae_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A"},
         {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}],
        "</s>",
    )
    assert multi == "### System:\nBe brief.\n### Human:\nA\n### Assistant:\nB</s>\n### Human:\nC\n### Assistant:\n"


@pytest.fixture
def tokenizer(tiny_checkpoint_factory):
    return AutoTokenizer.from_pretrained(str(tiny_checkpoint_factory("camelidae")))


def test_own_template_wins(tokenizer):
    f = ChatFormatter(tokenizer)
    assert not f.uses_fallback
    text = f.render(_msgs(("user", "hello")))
    assert "<|im_start|>user\nhello<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_fallback_without_a_template(tokenizer):
    tokenizer.chat_template = None
    f = ChatFormatter(tokenizer)
    assert f.uses_fallback
    assert f.render(_msgs(("developer", "rules"), ("user", "hello"))) == "### System:\nrules\n### Human:\nhello\n### Assistant:\n"


def test_override_and_template_errors_are_client_errors(tokenizer):
    f = ChatFormatter(tokenizer, template_override="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert f.render(_msgs(("user", "x"))) == "[x]"
    bad = ChatFormatter(tokenizer, template_override="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="chat template"):
        bad.render(_msgs(("user", "x")))
