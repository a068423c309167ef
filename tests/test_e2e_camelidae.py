"""End to end on the real bundled model: `python -m pesc_serve --model camelidae` defaults."""

from __future__ import annotations

import openai
import pytest

import dataclasses

from pesc_serve.__main__ import configs_from_args, parse_args
from tests.server_harness import running_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client():
    load, engine, _ = configs_from_args(parse_args(["--model", "camelidae"]))  # exactly the CLI's defaults
    engine = dataclasses.replace(engine, max_model_len=1024, kv_cache_memory_gb=0.5)  # less memory in CI
    with running_server("camelidae", load=load, engine=engine) as s:
        yield openai.OpenAI(base_url=s.v1, api_key="unused", max_retries=0, timeout=120)


def test_answers_paris(client):
    r = client.chat.completions.create(model="camelidae", messages=QUESTION, max_tokens=32, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_streamed_text_equals_non_streamed(client):
    kw = dict(model="camelidae", messages=QUESTION, max_tokens=32, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert streamed == full


def test_completions_with_token_ids(client):
    tok = client.completions.create(model="camelidae", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert tok.usage.prompt_tokens > 0 and tok.choices[0].text


def test_json_mode_gives_valid_json(client):
    import json

    ask = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    r = client.chat.completions.create(
        model="camelidae", messages=ask, max_tokens=64, temperature=0, response_format={"type": "json_object"}
    )
    assert r.choices[0].finish_reason == "stop"
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value, dict) and "Paris" in json.dumps(value)


def test_same_seed_same_text(client):
    kw = dict(model="camelidae", messages=[{"role": "user", "content": "Tell me a short story."}], max_tokens=24)
    a = client.chat.completions.create(temperature=0.9, seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(temperature=0.9, seed=1234, n=2, **kw).choices[0].message.content
    assert a == b  # choice 0 of n uses the request's seed itself
