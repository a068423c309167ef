"""Chat tool calling on a tiny random model: whatever the weights, a ``required`` or named call
parses and matches its tool's schema, ``auto`` gives a call or an answer, ``none`` plain text;
streamed calls assemble to the same call with no wrapper text in ``content``; history with
calls and results renders; every bad tools input is a 400 naming its field.  Real clients
(openai, instructor, langchain-openai) run against the same server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema_rs
import pytest

from pesc_serve.config import EngineConfig
from pesc_serve.server.tools import MAX_TOOLS
from tests.fixtures.tiny_checkpoints import make_checkpoint
from tests.server_harness import running_server, sse_events

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
CONVERT = {
    "type": "object",
    "properties": {"currency": {"type": "string", "enum": ["EUR", "USD"]}, "cents": {"type": "boolean"}},
    "required": ["currency", "cents"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "convert", "description": "Convert money", "parameters": CONVERT}},
]
SCHEMAS = {"get_weather": WEATHER, "convert": CONVERT}
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
HISTORY = ASK + [  # a call and its result
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, profile):
    ckpt = make_checkpoint("camelidae", tmp_path_factory.mktemp("tools"), max_position_embeddings=2048)
    engine = EngineConfig(max_num_seqs=8, max_model_len=2048, kv_cache_memory_gb=0.1)
    with running_server(str(ckpt), profile=profile, engine=engine) as s:
        yield s


def _chat(server, **body) -> httpx.Response:
    body.setdefault("messages", ASK)
    body.setdefault("max_tokens", 200)  # the tiny tokenizer spells JSON out nearly a character a token
    body.setdefault("temperature", 0)
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)


def _check_call(call: dict, allowed: set[str]) -> dict:
    assert call["type"] == "function" and call["id"].startswith("call_")
    name = call["function"]["name"]
    assert name in allowed
    args = json.loads(call["function"]["arguments"])
    jsonschema_rs.validate(SCHEMAS[name], args)
    return args


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_always_gives_a_call_that_matches_its_schema(server, seed):
    # One call per reply: random weights may otherwise go on adding calls until max_tokens.
    r = _chat(server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None and choice["message"]["tool_calls"]
    for call in choice["message"]["tool_calls"]:
        _check_call(call, {"get_weather", "convert"})


def test_a_named_function_is_the_one_called_and_finishes_with_stop(server):
    r = _chat(server, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "convert"}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 1 and _check_call(calls[0], {"convert"}) is not None
    assert choice["finish_reason"] == "stop"  # what OpenAI reports for a forced function


def test_parallel_calls_are_allowed_unless_parallel_tool_calls_is_false(server):
    counts = {}
    for parallel in (True, False):
        counts[parallel] = [len(_chat(server, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                                      temperature=1.0, seed=seed, max_tokens=200).json()["choices"][0]["message"]
                                .get("tool_calls") or []) for seed in range(4)]
    assert counts[False] == [1, 1, 1, 1]
    assert max(counts[True]) > 1  # these random weights do make several calls when allowed


def test_auto_gives_either_a_call_or_an_answer(server):
    seen = set()
    for seed in range(4):
        r = _chat(server, tools=TOOLS, tool_choice="auto", temperature=1.0, seed=seed, max_tokens=120)
        choice = r.json()["choices"][0]
        msg = choice["message"]
        if msg.get("tool_calls"):
            assert msg["content"] is None
            for call in msg["tool_calls"]:
                _check_call(call, {"get_weather", "convert"})
            seen.add("call")
        else:
            assert isinstance(msg["content"], str) and not msg["content"].startswith('{"response"')
            seen.add("answer")
    assert seen  # the random weights pick; either way the reply is well formed


def test_none_decodes_plain_text_without_the_tools_in_the_prompt(server):
    plain = _chat(server, max_tokens=4).json()
    none = _chat(server, tools=TOOLS, tool_choice="none", max_tokens=4).json()
    auto = _chat(server, tools=TOOLS, max_tokens=4).json()
    assert "tool_calls" not in none["choices"][0]["message"]
    assert none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] < auto["usage"]["prompt_tokens"]
    assert none["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def _streamed(server, **body) -> tuple[list[dict], str | None, list[dict]]:
    body.update(stream=True)
    body.setdefault("messages", ASK)
    body.setdefault("max_tokens", 200)  # the tiny tokenizer spells JSON out nearly a character a token
    body.setdefault("temperature", 0)
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [e for e in sse_events(r) if e != "[DONE]"]
    calls: dict[int, dict] = {}
    content = ""
    finish = None
    for e in events:
        for ch in e["choices"]:
            delta = ch["delta"]
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                entry = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                if "id" in tc:
                    assert entry["id"] is None, "id is sent once"
                    entry["id"], entry["name"] = tc["id"], tc["function"]["name"]
                entry["arguments"] += tc["function"].get("arguments", "")
            finish = ch["finish_reason"] or finish
    return [calls[i] for i in sorted(calls)], finish, [{"content": content}]


def test_a_streamed_call_assembles_to_the_unstreamed_one(server):
    body = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    whole = _chat(server, **body).json()["choices"][0]
    calls, finish, (text,) = _streamed(server, **body)
    assert text["content"] == ""  # no wrapper text leaks into content
    assert finish == whole["finish_reason"] == "tool_calls"
    want = whole["message"]["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (w["function"]["name"], json.loads(w["function"]["arguments"])) for w in want
    ]
    assert all(c["id"].startswith("call_") for c in calls)


def test_a_streamed_answer_is_plain_content(server):
    body = {"tools": TOOLS, "tool_choice": "auto", "max_tokens": 120}
    for seed in range(4):
        whole = _chat(server, **body, temperature=1.0, seed=seed).json()["choices"][0]
        if whole["message"].get("tool_calls"):
            continue
        calls, finish, (text,) = _streamed(server, **body, temperature=1.0, seed=seed)
        assert not calls and text["content"] == whole["message"]["content"] and finish == whole["finish_reason"]
        return
    pytest.skip("these weights called a tool for every seed")


def test_history_with_calls_and_results_renders(server):
    history = HISTORY
    r = _chat(server, messages=history, tools=TOOLS, max_tokens=8)
    assert r.status_code == 200, r.text
    longer = r.json()["usage"]["prompt_tokens"]
    assert longer > _chat(server, tools=TOOLS, max_tokens=8).json()["usage"]["prompt_tokens"]
    tok = httpx.post(server.url + "/tokenize", json={"messages": history}, timeout=30).json()
    text = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}, timeout=30).json()["prompt"]
    assert '"tool_response"' in text and "sunny, 21 C" in text and '"get_weather"' in text


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)]}, "tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "tool", "tool_call_id": "nope", "content": "x"}]},
     "messages[1].tool_call_id"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_bad_tools_input_is_a_400_naming_the_field(server, body, param):
    r = _chat(server, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param), err


def test_the_openai_client_calls_tools_streams_them_and_sends_results(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=200, temperature=0)
    call = out.choices[0].message.tool_calls[0]
    jsonschema_rs.validate(SCHEMAS[call.function.name], json.loads(call.function.arguments))
    pieces = {}
    for chunk in client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, max_tokens=200, temperature=0, stream=True):
        for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            pieces.setdefault(tc.index, "")
            pieces[tc.index] += tc.function.arguments or ""
    assert json.loads(pieces[0]) == json.loads(call.function.arguments)
    follow = client.chat.completions.create(
        model=model, max_tokens=8, temperature=0, tools=TOOLS,
        messages=ASK + [out.choices[0].message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_instructor_extracts_a_model_in_tools_and_json_schema_modes(server):
    import instructor
    from openai import OpenAI
    from pydantic import BaseModel, Field
    from typing import Annotated, Literal

    class Weather(BaseModel):  # bounded fields: random weights cannot run on until max_tokens
        city: Literal["Paris", "Rome", "Oslo"]
        days: Annotated[int, Field(ge=1, le=9)]

    client = OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        patched = instructor.from_openai(client, mode=mode)
        got = patched.chat.completions.create(model=model, response_model=Weather, messages=ASK, max_tokens=200,
                                              temperature=0, max_retries=0)
        assert isinstance(got, Weather) and got.city in ("Paris", "Rome", "Oslo")


def test_langchain_bind_tools_gets_tool_calls(server):
    from typing import Annotated, Literal

    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class WeatherArgs(BaseModel):  # bounded fields: random weights cannot run on until max_tokens
        city: Literal["Paris", "Rome", "Oslo"]
        days: Annotated[int, Field(ge=1, le=9)]

    @tool(args_schema=WeatherArgs)
    def get_weather(city: str, days: int) -> str:
        """Weather in a city for some days."""
        return "sunny"

    model = httpx.get(server.v1 + "/models", timeout=30).json()["data"][0]["id"]
    llm = ChatOpenAI(base_url=server.v1, api_key="none", model=model, temperature=0, max_tokens=200, max_retries=0)
    msg = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False).invoke(
        "Weather in Paris for 3 days?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert set(msg.tool_calls[0]["args"]) >= {"city", "days"}


# --- a chat template that takes tools itself (Hermes / Qwen2.5 style) ----------------------------

HERMES = Path(__file__).parent / "fixtures" / "hermes_tools.jinja"


@pytest.fixture(scope="module")
def hermes(tmp_path_factory):
    ckpt = make_checkpoint("camelidae", tmp_path_factory.mktemp("hermes"), max_position_embeddings=2048)
    engine = EngineConfig(max_num_seqs=8, max_model_len=2048, kv_cache_memory_gb=0.1)
    with running_server(str(ckpt), profile="defaults", engine=engine, chat_template=HERMES) as s:
        yield s


def test_a_template_that_takes_tools_lays_them_out_itself(hermes):
    history = HISTORY
    r = _chat(hermes, messages=history, tools=TOOLS, max_tokens=4)
    assert r.status_code == 200, r.text
    body = {"messages": history, "chat_template_kwargs": {"tools": TOOLS}}
    assert httpx.post(hermes.url + "/tokenize", json=body, timeout=30).status_code == 400  # tools is reserved
    tok = httpx.post(hermes.url + "/tokenize", json={"messages": history, "tools": TOOLS}, timeout=30).json()
    text = httpx.post(hermes.url + "/detokenize", json={"tokens": tok["tokens"]}, timeout=30).json()["prompt"]
    assert "<tools>" in text and '"name": "get_weather"' in text and "<tool_response>\nsunny, 21 C" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}' in text
    assert '{"tool_calls"' not in text  # not the generic format


@pytest.mark.parametrize("seed", [0, 1])
def test_required_gives_tool_call_blocks_that_match_their_schema(hermes, seed):
    r = _chat(hermes, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None and len(choice["message"]["tool_calls"]) == 1
    _check_call(choice["message"]["tool_calls"][0], {"get_weather", "convert"})


def test_a_named_function_through_the_template(hermes):
    r = _chat(hermes, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and _check_call(choice["message"]["tool_calls"][0], {"get_weather"})


def test_streamed_tool_call_blocks_assemble_without_leaking_into_content(hermes):
    body = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    whole = _chat(hermes, **body).json()["choices"][0]
    calls, finish, (text,) = _streamed(hermes, **body)
    assert text["content"] == "" and finish == "tool_calls"
    want = whole["message"]["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (w["function"]["name"], json.loads(w["function"]["arguments"])) for w in want]
