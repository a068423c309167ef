"""Every invalid request gets an OpenAI error object with the right status: 400 for bad input
(never FastAPI's 422), 404 for an unknown model or route, 405 for a wrong method, 413 for an
oversized body; unknown fields are ignored."""

from __future__ import annotations

import httpx
import pytest

from pesc_serve.config import EngineConfig, ServerConfig
from tests.server_harness import running_server

MAX_MODEL_LEN = 128
BODY_LIMIT = 64 * 1024
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory):
    with running_server(
        str(tiny_checkpoint_factory("camelidae")),
        engine=EngineConfig(max_num_seqs=8, max_model_len=MAX_MODEL_LEN, kv_cache_memory_gb=0.05),
        server=ServerConfig(max_body_bytes=BODY_LIMIT),
    ) as s:
        yield s


def _post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(server.v1 + path, timeout=30, **kw)


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


CHAT_400 = [
    # wrong types
    ({"messages": "hello"}, "messages"),
    ({"messages": MSG, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": MSG, "temperature": "hot"}, "temperature"),
    ({"messages": MSG, "stream": "yes please"}, "stream"),
    ({"messages": MSG, "stop": 7}, "stop"),
    ({"messages": MSG, "stop": [1, 2]}, "stop"),
    ({"messages": MSG, "logit_bias": [1, 2]}, "logit_bias"),
    ({"messages": MSG, "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ({"messages": MSG, "seed": "abc"}, "seed"),
    ({"messages": MSG, "stop_token_ids": ["x"]}, "stop_token_ids.0"),
    # out of range
    ({"messages": MSG, "temperature": -0.1}, "temperature"),
    ({"messages": MSG, "temperature": 2.5}, "temperature"),
    ({"messages": MSG, "top_p": 1.5}, "top_p"),
    ({"messages": MSG, "top_k": -2}, "top_k"),
    ({"messages": MSG, "min_p": 1.5}, "min_p"),
    ({"messages": MSG, "n": 0}, "n"),
    ({"messages": MSG, "n": 100}, "n"),
    ({"messages": MSG, "max_tokens": -1}, "max_tokens"),
    ({"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": MSG, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": MSG, "frequency_penalty": -3}, "frequency_penalty"),
    ({"messages": MSG, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": MSG, "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": MSG, "logit_bias": {"999999": 1}}, None),
    ({"messages": MSG, "stop_token_ids": [999999]}, None),
    ({"messages": MSG, "seed": 2**64}, "seed"),
    ({"messages": MSG, "top_logprobs": 3}, None),  # needs logprobs: true
    ({"messages": MSG, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": MSG, "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"messages": MSG, "stop": [""]}, "stop"),
    ({"messages": MSG, "stop": ["x"] * 17}, "stop"),
    ({"messages": MSG, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": MSG, "response_format": {"type": "json_schema"}}, "response_format"),
    # empty or malformed messages, unknown roles
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{}]}, "messages.0.role"),
    ({"messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"messages": ["just a string"]}, "messages.0"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, None),
]


@pytest.mark.parametrize("body,param", CHAT_400, ids=[str(i) for i in range(len(CHAT_400))])
def test_bad_chat_requests_are_400(server, body, param):
    err = _assert_error(_post(server, "/chat/completions", json=body), 400, param)
    assert err["type"] == "invalid_request_error"


COMPLETION_400 = [
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [-1, 3]}, None),
    ({"prompt": [10**9]}, None),
    ({"prompt": "hi", "logprobs": 9}, "logprobs"),
    ({"prompt": "hi", "best_of": 3}, None),
    ({"prompt": "hi", "suffix": "tail"}, None),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
]


@pytest.mark.parametrize("body,param", COMPLETION_400, ids=[str(i) for i in range(len(COMPLETION_400))])
def test_bad_completion_requests_are_400(server, body, param):
    _assert_error(_post(server, "/completions", json=body), 400, param)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2", b'{"messages": [}', b"\xff\xfe", b"null", b"[]", b'"a string"'],
)
def test_invalid_json_bodies_are_400(server, content):
    r = _post(server, "/chat/completions", content=content, headers={"content-type": "application/json"})
    _assert_error(r, 400)


def test_prompt_longer_than_context_names_both_lengths(server):
    ids = list(range(3, 3 + MAX_MODEL_LEN + 10))
    err = _assert_error(_post(server, "/completions", json={"prompt": ids, "max_tokens": 1}), 400, "prompt")
    assert str(MAX_MODEL_LEN) in err["message"] and str(len(ids)) in err["message"]
    # prompt fits but prompt + max_tokens does not: both numbers again
    err = _assert_error(_post(server, "/completions", json={"prompt": [5] * 100, "max_tokens": 100}), 400, "max_tokens")
    assert str(MAX_MODEL_LEN) in err["message"] and "100" in err["message"]
    long_chat = [{"role": "user", "content": "the quick brown fox " * 200}]
    err = _assert_error(_post(server, "/chat/completions", json={"messages": long_chat}), 400, "messages")
    assert str(MAX_MODEL_LEN) in err["message"] and "prompt has" in err["message"]
    err = _assert_error(_post(server, "/completions", json={"prompt": [10**6]}), 400, "prompt")


def test_unknown_model_is_404(server):
    err = _assert_error(_post(server, "/chat/completions", json={"model": "gpt-5", "messages": MSG}), 404, "model")
    assert "gpt-5" in err["message"]
    _assert_error(_post(server, "/completions", json={"model": "gpt-5", "prompt": "x"}), 404, "model")
    _assert_error(httpx.get(server.v1 + "/models/gpt-5"), 404, "model")


def test_unknown_route_and_wrong_method(server):
    _assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    _assert_error(httpx.get(server.v1 + "/chat/completions"), 405)


def test_oversized_bodies_are_413(server):
    big = {"messages": [{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]}
    err = _assert_error(_post(server, "/chat/completions", json=big), 413)
    assert str(BODY_LIMIT) in err["message"]

    def chunks():  # no Content-Length: the limit applies to what is streamed
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b" " * 1024

    r = _post(server, "/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    _assert_error(r, 413)


def test_unknown_fields_are_ignored(server):
    body = {
        "messages": [{"role": "user", "content": "hi", "weird": 1}],
        "max_tokens": 2,
        "tools": [],
        "some_vendor_extra": {"a": [1, 2]},
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    r = _post(server, "/chat/completions", json=body)
    assert r.status_code == 200, r.text
    r = _post(server, "/completions", json={"prompt": "hi", "max_tokens": 2, "frobnicate": True})
    assert r.status_code == 200, r.text


def test_valid_edge_values_are_accepted(server):
    """The boundaries themselves are valid: no off-by-one 400s."""
    body = {
        "messages": [{"role": "system", "content": None}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 1,
        "temperature": 2.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "n": 2,
        "seed": -(2**63),
        "presence_penalty": -2,
        "frequency_penalty": 2,
        "repetition_penalty": 2.0,
        "logit_bias": {"5": -100, "6": 100},
        "logprobs": True,
        "top_logprobs": 20,
        "stop": "x",
    }
    r = _post(server, "/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])
