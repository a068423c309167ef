"""``response_format``: constrained decoding that always yields a JSON object (or a value of
the given JSON schema) when the request stops, even on a random tiny model; ``length`` when
max_tokens cuts it; seeded JSON-mode sampling reproduces."""

from __future__ import annotations

import json

import httpx
import pytest

from pesc_serve.engine.engine import LLMEngine
from pesc_serve.engine.request import FinishReason, SamplingParams
from pesc_serve.engine.structured_output import StructuredOutputFactory, schema_error
from pesc_serve.models.loader import load_model
from pesc_serve.models.tokenizer import load_tokenizer
from pesc_serve.registry import resolve_model
from tests.fixtures.tiny_checkpoints import EOS_TOKEN_ID
from tests.profiles import engine_config, load_config
from tests.server_harness import running_server, sse_events

SMALL_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def parts(tiny_checkpoint_factory, profile):
    src = resolve_model(str(tiny_checkpoint_factory("camelidae")))
    return load_model(src, load_config(profile, str(src.path))), load_tokenizer(src), profile


@pytest.fixture(scope="module")
def factory(parts):
    return StructuredOutputFactory(parts[1], (EOS_TOKEN_ID,))


def _run(engine: LLMEngine, requests: dict[str, SamplingParams], prompt=(5, 9, 33, 41)) -> dict[str, tuple[str, object]]:
    for rid, params in requests.items():
        engine.add_request(rid, list(prompt), params)
    text: dict[str, str] = {rid: "" for rid in requests}
    done: dict[str, tuple[str, object]] = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            text[o.request_id] += o.new_text
            if o.finished:
                assert o.error is None, o.error
                done[o.request_id] = (text[o.request_id], o.finish_reason, o.num_output_tokens)
    assert not engine.has_unfinished()
    return done


def test_matcher_masks_accepts_and_terminates(parts, factory):
    tok = parts[1]
    m = factory.matcher()
    vocab = parts[0].config.vocab_size + 7  # a model may pad its vocabulary beyond the tokenizer's
    mask = m.allowed_mask(vocab)
    assert mask.shape == (vocab,) and not mask[-7:].any()
    allowed = [tok.decode([i]) for i in mask.nonzero().flatten().tolist()]
    assert allowed and all(t.startswith("{") for t in allowed)
    assert not mask[EOS_TOKEN_ID]
    for t in tok.encode('{"a": [1, true]', add_special_tokens=False):
        assert m.allowed_mask(vocab)[t]
        assert m.accept(t)
    assert not m.is_terminated
    assert m.accept(tok.encode("}", add_special_tokens=False)[0])
    assert m.is_terminated
    bad = factory.matcher()
    assert not bad.accept(tok.encode("x", add_special_tokens=False)[0])
    assert bad.error


def test_schema_errors_are_reported():
    assert schema_error(SMALL_SCHEMA) is None
    assert "bogus" in schema_error({"type": "bogus"})
    assert schema_error({"$ref": "#/nowhere"})


def test_json_mode_outputs_parse_when_they_stop(parts):
    engine = LLMEngine(parts[0], parts[1], engine_config(parts[2], max_num_seqs=16, max_model_len=128, kv_cache_memory_gb=0.01))
    reqs = {f"s{i}": SamplingParams(max_tokens=48, temperature=1.0, seed=i, json_mode=True) for i in range(12)}
    reqs["greedy"] = SamplingParams(max_tokens=48, temperature=0.0, json_mode=True)
    reqs["min_tokens"] = SamplingParams(max_tokens=48, temperature=1.0, seed=3, min_tokens=40, json_mode=True)
    done = _run(engine, reqs)
    stopped = [text for text, reason, _ in done.values() if reason == FinishReason.STOP]
    assert stopped, done
    for text in stopped:
        assert isinstance(json.loads(text), dict), text
    for text, reason, n in done.values():
        assert reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert text.startswith("{")
        if reason == FinishReason.LENGTH:
            assert n == 48
    assert engine.kv.usage == 0


def test_json_schema_outputs_match_the_schema(parts):
    engine = LLMEngine(parts[0], parts[1], engine_config(parts[2], max_num_seqs=8, max_model_len=128, kv_cache_memory_gb=0.01))
    reqs = {f"s{i}": SamplingParams(max_tokens=40, temperature=1.0, seed=i, json_mode=True, json_schema=SMALL_SCHEMA) for i in range(6)}
    done = _run(engine, reqs)
    for text, reason, _ in done.values():
        assert reason == FinishReason.STOP, (text, reason)  # the schema leaves no room for rambling
        value = json.loads(text)
        assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)


def test_seeded_json_mode_reproduces_in_any_batch(parts):
    cfg = engine_config(parts[2], max_num_seqs=8, max_model_len=128, kv_cache_memory_gb=0.01)
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=11, json_mode=True)
    alone = _run(LLMEngine(parts[0], parts[1], cfg), {"a": params})["a"]
    noisy = {f"n{i}": SamplingParams(max_tokens=30, temperature=1.0, json_mode=i % 2 == 0) for i in range(3)}
    together = _run(LLMEngine(parts[0], parts[1], cfg), {"a": params, **noisy})["a"]
    assert alone == together


# ---- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory, profile):
    with running_server(str(tiny_checkpoint_factory("camelidae")), profile=profile) as s:
        yield s


def test_chat_json_object_over_http(server):
    url = server.v1 + "/chat/completions"
    base = {"messages": [{"role": "user", "content": "Reply in JSON."}], "response_format": {"type": "json_object"}}
    stopped = 0
    for seed in range(6):
        r = httpx.post(url, json=dict(base, max_tokens=40, seed=seed, temperature=1.0), timeout=30)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            stopped += 1
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:
            assert choice["finish_reason"] == "length"
    assert stopped
    with httpx.stream("POST", url, json=dict(base, max_tokens=40, seed=0, temperature=1.0, stream=True), timeout=30) as resp:
        events = sse_events(resp)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    plain = httpx.post(url, json=dict(base, max_tokens=40, seed=0, temperature=1.0), timeout=30).json()
    assert streamed == plain["choices"][0]["message"]["content"]


def test_length_cut_off_is_reported(server):
    tok = server.server.engine.tokenizer
    closing = [i for i in range(len(tok)) if tok.decode([i]).startswith("{}")]  # no one-token "{}"
    body = {
        "prompt": "x",
        "max_tokens": 1,
        "response_format": {"type": "json_object"},
        "temperature": 0,
        "logit_bias": {str(i): -100 for i in closing},
    }
    r = httpx.post(server.v1 + "/completions", json=body, timeout=30)
    choice = r.json()["choices"][0]
    assert choice["text"].startswith("{") and choice["finish_reason"] == "length"


def test_json_schema_over_http(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL_SCHEMA, "strict": True}}
    r = httpx.post(server.v1 + "/completions", json={"prompt": "x", "max_tokens": 40, "response_format": fmt}, timeout=30)
    assert r.status_code == 200, r.text
    value = json.loads(r.json()["choices"][0]["text"])
    assert set(value) == {"n", "ok"}
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "bogus"}}}
    r = httpx.post(server.v1 + "/completions", json={"prompt": "x", "response_format": bad}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def _accepts(factory, tok, schema, text: str) -> bool:
    m = factory.matcher(schema)
    return all(m.accept(t) for t in tok.encode(text, add_special_tokens=False))


def test_objects_take_no_unlisted_keys_unless_the_schema_allows_them(parts, factory):
    """As llama.cpp and vLLM (xgrammar strict mode) decode schemas: an unstated
    additionalProperties means none, so a small model cannot wander off into invented keys."""
    tok = parts[1]
    open_schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert _accepts(factory, tok, open_schema, '{"n": 1}')
    assert not _accepts(factory, tok, open_schema, '{"n": 1, "x": 2}')
    nested = {"type": "object", "properties": {"a": {"type": "array", "items": open_schema}}, "required": ["a"]}
    assert not _accepts(factory, tok, nested, '{"a": [{"n": 1, "x": 2}]}')
    allowed = {**open_schema, "additionalProperties": True}
    assert _accepts(factory, tok, allowed, '{"n": 1, "x": 2}')
