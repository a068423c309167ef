"""Chat prompts: the tokenizer's own template, else the Camelidae training format."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pesc_serve.server.chat import ChatFormatter, ChatTemplateError, camelidae_prompt
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


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}",  # TypeError inside the template
        "{{ messages | no_such_filter }}",  # a template that does not compile
        "{{ undefined_helper() }}",  # calls something that does not exist
    ],
)
def test_a_broken_template_is_the_servers_fault(tokenizer, template):
    with pytest.raises(ChatTemplateError):
        ChatFormatter(tokenizer, template_override=template).render(_msgs(("user", "x")))


def test_template_kwargs_cannot_override_the_renderers_own_arguments(tokenizer):
    with pytest.raises(ValueError, match="tokenize"):
        ChatFormatter(tokenizer).render(_msgs(("user", "x")), tokenize=True)


def test_template_errors_map_to_400_and_500_over_http(tiny_checkpoint_factory, tokenizer):
    import httpx

    from tests.server_harness import running_server

    with running_server(str(tiny_checkpoint_factory("camelidae"))) as server:
        serving = server.server.app.state.serving
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        serving.formatter = ChatFormatter(tokenizer, "{{ raise_exception('roles must alternate') }}")
        r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages"
        serving.formatter = ChatFormatter(tokenizer, "{{ messages[0]['content'] + 1 }}")
        r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "chat_template_error"
        r = httpx.post(server.v1 + "/chat/completions", json=dict(body, chat_template_kwargs={"tokenize": True}), timeout=30)
        assert r.status_code == 400
