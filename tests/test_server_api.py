"""The OpenAI API end to end (uvicorn + engine thread) on a tiny random Camelidae checkpoint,
driven by the official ``openai`` client and raw HTTP where the client hides the wire format."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server_harness import running_server

MESSAGES = [{"role": "user", "content": "Say something about the sea."}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory, profile):
    with running_server(str(tiny_checkpoint_factory("camelidae")), profile=profile) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def _sse_events(resp: httpx.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.server.model_name]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_completion_shape(client, server):
    r = client.chat.completions.create(model=server.server.model_name, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_non_stream(client):
    kwargs = dict(model=_model(client), messages=MESSAGES, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format_ends_with_done(server):
    body = {"messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert len({e["id"] for e in events[:-1]}) == 1


def test_completions_with_token_ids_and_logprobs(client):
    r = client.completions.create(model=_model(client), prompt=[5, 17, 42, 99, 3], max_tokens=6, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert r.usage.prompt_tokens == 5
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)  # partial UTF-8 tokens get distinct "bytes:" names
    if not any(t.startswith("bytes:") for t in lp.tokens):
        assert "".join(lp.tokens) == r.choices[0].text


def test_completions_client_string_prompt_stream(client):
    kw = dict(prompt="The sea is", max_tokens=8, temperature=0)
    full = client.completions.create(model=_model(client), **kw)
    parts = list(client.completions.create(model=_model(client), stream=True, **kw))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text


def _model(client) -> str:
    return client.models.list().data[0].id


def test_greedy_is_deterministic_and_seed_reproduces(client):
    m = _model(client)
    a = client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=10, temperature=0)
    b = client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=10, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    s1 = client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=7)
    s2 = client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=7)
    assert s1.choices[0].message.content == s2.choices[0].message.content


def test_n_choices_and_chat_logprobs(client):
    r = client.chat.completions.create(
        model=_model(client), messages=MESSAGES, max_tokens=5, temperature=1.0, n=3, seed=1, logprobs=True, top_logprobs=2
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        assert c.logprobs is not None and len(c.logprobs.content) >= 1
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)


def test_max_tokens_gives_length(client):
    r = client.chat.completions.create(
        model=_model(client), messages=MESSAGES, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_stop_string_never_leaks_into_stream(client):
    """Pick a stop string that straddles tokens of the greedy output; it must not appear."""
    m = _model(client)
    kw = dict(model=m, messages=MESSAGES, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    text = client.chat.completions.create(**kw).choices[0].message.content
    assert len(text) > 12
    stop = text[6:10]
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, stop=[stop], **kw) if c.choices
    )
    plain = client.chat.completions.create(stop=[stop], **kw)
    assert streamed == plain.choices[0].message.content == text[: text.index(stop)]
    assert plain.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": MESSAGES, "temperature": 5}, "temperature"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "n": "many"}, "n"),
        ({}, "messages"),
    ],
)
def test_invalid_requests_get_openai_400(server, body, param):
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_invalid_json_and_prompt_too_long(server):
    r = httpx.post(server.v1 + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    long_prompt = list(range(3, 300))
    r = httpx.post(server.v1 + "/completions", json={"prompt": long_prompt, "max_tokens": 4}, timeout=30)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "256" in msg and str(len(long_prompt)) in msg


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=_model(client), messages=MESSAGES, temperature=-1)


def test_streamed_text_offsets_equal_the_non_streamed_ones(server):
    """A partial UTF-8 token (``bytes:\\xNN``) adds no text, streamed or not."""
    text_of = server.server.app.state.serving.text_of
    vocab = server.server.engine.engine.vocab_size
    byte_token = next(t for t in range(vocab) if text_of(t).startswith("bytes:"))
    greedy = {"prompt": [5, 17, 42], "max_tokens": 12, "temperature": 0, "logprobs": 1}
    for body in (greedy, dict(greedy, logit_bias={str(byte_token): 100})):
        plain = httpx.post(server.v1 + "/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
        with httpx.stream("POST", server.v1 + "/completions", json=dict(body, stream=True), timeout=60) as resp:
            events = [e for e in _sse_events(resp)[:-1] if e["choices"]]
        tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
        offsets = [o for e in events for o in e["choices"][0]["logprobs"]["text_offset"]]
        assert tokens == plain["tokens"] and len(tokens) == 12
        assert offsets == plain["text_offset"]
    assert all(t.startswith("bytes:") for t in tokens)
