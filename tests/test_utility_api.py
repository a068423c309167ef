"""``/tokenize``, ``/detokenize``, ``/version`` and the ``X-Request-Id`` header."""

from __future__ import annotations

import httpx
import pytest

from tests.server_harness import running_server


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory):
    with running_server(str(tiny_checkpoint_factory("qwen2idae")), profile="exact") as s:
        yield s


def test_tokenize_counts_what_a_completion_sees(server):
    messages = [{"role": "user", "content": "hello there, how are you?"}]
    tok = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    chat = httpx.post(server.v1 + "/chat/completions", json={"messages": messages, "max_tokens": 2}).json()
    assert tok["count"] == len(tok["tokens"]) == chat["usage"]["prompt_tokens"]
    assert tok["max_model_len"] == server.server.engine.max_model_len and tok["token_strs"] is None
    plain = httpx.post(server.url + "/tokenize", json={"prompt": "hello there", "return_token_strs": True}).json()
    comp = httpx.post(server.v1 + "/completions", json={"prompt": "hello there", "max_tokens": 1}).json()
    assert plain["count"] == comp["usage"]["prompt_tokens"] and len(plain["token_strs"]) == plain["count"]
    back = httpx.post(server.url + "/detokenize", json={"tokens": plain["tokens"]}).json()
    assert "hello there" in back["prompt"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, None),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, None),
    ("/detokenize", {"tokens": [10**7]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
])
def test_bad_bodies_are_400s(server, path, body, param):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400, r.text
    if param:
        assert r.json()["error"]["param"] == param


def test_an_unknown_model_is_a_404(server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "a", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_version(server):
    r = httpx.get(server.url + "/version")
    assert r.status_code == 200 and r.json()["version"]


def test_x_request_id_is_echoed_and_names_the_request(server):
    r = httpx.post(server.v1 + "/completions", json={"prompt": "hi", "max_tokens": 1},
                   headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert r.json()["id"] == "cmpl-trace-42"
    chat = httpx.post(server.v1 + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "max_tokens": 1}, headers={"X-Request-Id": "abc"})
    assert chat.json()["id"] == "chatcmpl-abc" and chat.headers["x-request-id"] == "abc"
    assert httpx.get(server.url + "/health", headers={"X-Request-Id": "h1"}).headers["x-request-id"] == "h1"
    assert "x-request-id" not in httpx.post(server.v1 + "/completions", json={"prompt": "hi", "max_tokens": 1}).headers
    bad = httpx.post(server.v1 + "/completions", json={"prompt": "hi", "max_tokens": 1},
                     headers={"X-Request-Id": "spaces are bad"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"
