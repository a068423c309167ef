"""Request surface details over the wire: stop strings split across streamed tokens never
leak, usage chunks, max_completion_tokens, logit_bias, stop_token_ids/min_tokens, and seed
reproducibility whatever else is in the batch."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.server_harness import running_server, sse_events

MSG = [{"role": "user", "content": "Say something about the sea."}]
GREEDY = {"messages": MSG, "max_tokens": 40, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory, profile):
    with running_server(str(tiny_checkpoint_factory("camelidae")), profile=profile) as s:
        yield s


def _chat(server, **body) -> dict:
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _stream_chat(server, **body) -> tuple[list[str], list[dict]]:
    with httpx.stream("POST", server.v1 + "/chat/completions", json=dict(body, stream=True), timeout=60) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    return [c["choices"][0]["delta"].get("content", "") for c in chunks], chunks


@pytest.fixture(scope="module")
def greedy_tokens(server) -> list[str]:
    """The greedy reply as the texts of its stream chunks (one token each, when not empty)."""
    pieces, _ = _stream_chat(server, **GREEDY)
    assert "".join(pieces) == _chat(server, **GREEDY)["choices"][0]["message"]["content"]
    return [p for p in pieces if p]


def _straddling_stop(tokens: list[str], span: int) -> tuple[str, int]:
    """A stop string made of the tail of one token, ``span - 2`` whole tokens and the head of
    the next, whose first occurrence is exactly there; returns it and its offset."""
    text = "".join(tokens)
    offset = 0
    for i in range(len(tokens) - span):
        offset += len(tokens[i])
        if i < 2 or len(tokens[i]) < 2 or len(tokens[i + span - 1]) < 2:
            continue
        middle = "".join(tokens[i + 1 : i + span - 1])
        stop = tokens[i][-1:] + middle + tokens[i + span - 1][:1]
        start = offset - 1
        if text.find(stop) == start and stop.strip() and stop.isascii() and stop.isprintable():
            return stop, start
    pytest.skip("no straddling stop string in this output")


@pytest.mark.parametrize("span", [2, 3])
def test_stop_string_split_across_chunks_never_leaks(server, greedy_tokens, span):
    text = "".join(greedy_tokens)
    stop, start = _straddling_stop(greedy_tokens, span)
    pieces, chunks = _stream_chat(server, stop=stop, **GREEDY)
    assert "".join(pieces) == text[:start]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    plain = _chat(server, stop=[stop], **GREEDY)["choices"][0]
    assert plain["message"]["content"] == text[:start] and plain["stop_reason"] == stop
    kept = _chat(server, stop=[stop], include_stop_str_in_output=True, **GREEDY)["choices"][0]["message"]["content"]
    assert kept == text[: start + len(stop)]


def test_earliest_of_several_stops_wins_in_completions_stream(server):
    body = {"prompt": "The sea", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}

    def stream(**extra) -> list[dict]:
        with httpx.stream("POST", server.v1 + "/completions", json=dict(body, **extra), timeout=60) as resp:
            return sse_events(resp)

    pieces = [e["choices"][0]["text"] for e in stream()[:-1] if e["choices"]]
    text = "".join(pieces)
    first, start = _straddling_stop([p for p in pieces if p], 2)
    later = text[start + len(first) :][-4:]  # also in the text, but after the first stop
    if not later or text.find(later) <= start:
        pytest.skip("no second stop string after the first one in this output")
    events = stream(stop=[later, first], stream_options={"include_usage": True})
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == text[:start]
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0


def test_max_completion_tokens_is_an_alias(server):
    r = _chat(server, messages=MSG, max_completion_tokens=3, ignore_eos=True, temperature=0)
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"


def test_logit_bias_forces_a_token(server):
    tok = server.server.engine.tokenizer
    forced = tok.encode(" sea", add_special_tokens=False)[0]
    r = _chat(server, messages=MSG, max_tokens=4, ignore_eos=True, temperature=1.0, logit_bias={str(forced): 100})
    assert r["choices"][0]["message"]["content"] == tok.decode([forced]) * 4


def test_stop_token_ids_and_min_tokens(server):
    stop_id = server.server.engine.tokenizer.encode(" sea", add_special_tokens=False)[0]
    forced = dict(GREEDY, stop_token_ids=[stop_id], logit_bias={str(stop_id): 100})
    r = _chat(server, **forced)
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] == stop_id
    assert r["usage"]["completion_tokens"] == 1
    r = _chat(server, min_tokens=3, **forced)  # banned for the first 3 tokens, then forced
    assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["stop_reason"] == stop_id


def test_seed_reproduces_whatever_else_runs(server):
    body = {"messages": MSG, "max_tokens": 12, "temperature": 1.0, "seed": 99, "ignore_eos": True}

    async def many() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as client:
            noise = [client.post(server.v1 + "/chat/completions", json=dict(body, seed=None)) for _ in range(4)]
            same = [client.post(server.v1 + "/chat/completions", json=body) for _ in range(4)]
            results = await asyncio.gather(*same, *noise)
        return [r.json()["choices"][0]["message"]["content"] for r in results[:4]]

    alone = _chat(server, **body)["choices"][0]["message"]["content"]
    assert asyncio.run(many()) == [alone] * 4
    n3 = _chat(server, n=3, **body)
    assert [c["message"]["content"] for c in n3["choices"]] == [
        c["message"]["content"] for c in _chat(server, n=3, **body)["choices"]
    ]
    assert n3["choices"][0]["message"]["content"] == alone
    completion = {"prompt": "The sea", "max_tokens": 8, "temperature": 1.0, "seed": 5}
    texts = {httpx.post(server.v1 + "/completions", json=completion, timeout=60).json()["choices"][0]["text"] for _ in range(3)}
    assert len(texts) == 1


def test_sse_payloads_never_contain_characters_line_splitters_break_on():
    """A token decoding to U+2028, U+2029 or NEL must not split its event for clients that
    read lines with str.splitlines() semantics (httpx's iter_lines does)."""
    from pesc_serve.server.serving import sse_json

    event = {"choices": [{"text": "a\u2028b\x85c\u2029d\x0be\nf"}]}
    payload = sse_json(event)
    assert payload.splitlines() == [payload]
    assert json.loads(payload) == event
