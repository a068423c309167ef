"""The generic tool format's parsers: a reply streamed in any split gives the deltas that
assemble to what the finished reply parses to, and no wrapper text ever reaches content."""

from __future__ import annotations

import json
import random

import pytest

from pesc_serve.server.tools import ToolPlan, ToolStreamParser, Tool, parse_reply

PLAN = ToolPlan([Tool("f", "", {"type": "object"}), Tool("g", "", {"type": "object"})], "auto")

REPLIES = [
    '{"response": "plain answer"}',
    '{"response": "quote \\" backslash \\\\ newline \\n unicode \\u00e9 pair \\ud83d\\ude00 end"}',
    '{"tool_calls": [{"name": "f", "arguments": {"x": 1, "s": "a}b]c\\"d"}}]}',
    '{"tool_calls": [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"deep": {"l": [1, {"m": null}]}}}]}',
]


def _splits(text: str, seed: int, trials: int = 30) -> list[list[int]]:
    """Cut points: a character at a time, then random ones."""
    rng = random.Random(seed)
    cuts = [list(range(1, len(text)))]
    for _ in range(trials - 1):
        cuts.append(sorted(rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1)))))
    return cuts


def _stream(text: str, splits: list[int]) -> tuple[str, list[dict]]:
    parser = ToolStreamParser()
    content = ""
    calls: dict[int, dict] = {}
    last = 0
    for cut in splits + [len(text)]:
        step = parser.feed(text[last:cut])
        last = cut
        content += step.content
        for tc in step.tool_calls:
            entry = calls.setdefault(tc["index"], {"name": None, "arguments": ""})
            if "id" in tc:
                assert entry["name"] is None
                entry["name"] = tc["function"]["name"]
            entry["arguments"] += tc["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("text", REPLIES)
def test_any_split_of_a_reply_assembles_to_its_parse(text):
    whole = parse_reply(text, PLAN)
    for splits in _splits(text, seed=0):
        content, calls = _stream(text, splits)
        if whole.tool_calls:
            assert content == ""
            assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
                (c.name, json.loads(c.arguments)) for c in whole.tool_calls]
        else:
            assert calls == [] and content == whole.content == json.loads(text)["response"]


def test_a_reply_cut_by_max_tokens_keeps_what_arrived():
    assert parse_reply('{"response": "half an ans', PLAN).content == "half an ans"
    cut = parse_reply('{"tool_calls": [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"y', PLAN)
    assert cut.content is None and [c.name for c in cut.tool_calls] == ["f", "g"]
    assert cut.tool_calls[0].arguments == '{"x": 1}' and cut.tool_calls[1].arguments == '{"y'
    assert parse_reply('{"tool', PLAN).content == '{"tool'  # not yet either form: the raw text


NATIVE = ToolPlan(PLAN.tools, "auto", native=True)
NATIVE_REPLIES = [
    "Just an answer, no <tool_call here.",
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
    'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "g", "arguments": {"s": "</tool"}}\n</tool_call>',
]


@pytest.mark.parametrize("text", NATIVE_REPLIES)
def test_hermes_blocks_stream_as_calls_and_the_rest_as_content(text):
    from pesc_serve.server.tools import NativeStreamParser

    whole = parse_reply(text, NATIVE)
    for splits in _splits(text, seed=1):
        parser, content, calls, last = NativeStreamParser(), "", [], 0
        for cut in splits + [len(text)]:
            step = parser.feed(text[last:cut])
            last = cut
            content += step.content
            calls += [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in step.tool_calls]
        content += parser.finish()
        assert calls == [(c.name, json.loads(c.arguments)) for c in whole.tool_calls]
        assert content.strip() == (whole.content or "")
        assert "<tool_call>" not in content or not whole.tool_calls
