"""Chat tool calling: the generic tool format, its grammar, and the parsers of its output.

Why one generic format: the bundled models' chat templates (SmolLM2's, the Camelidae
fallback) know nothing of tools, and a 135M model does not reliably invent a call syntax.
As llama.cpp's Generic handler does, the tools' JSON schemas go into the system message
with one fixed reply format, a JSON object that is either a call or an answer::

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    {"response": "It is sunny."}

and decoding is constrained (llguidance, through ``response_format``'s JSON-schema path) to
that object: for ``required`` and a named function to calls only, whose ``name`` is one of
the tools and whose ``arguments`` match that tool's ``parameters``; for ``auto`` to either
form.  The call therefore always parses, whatever the weights.  ``none`` leaves the tools
out of the prompt and decodes plain text.

Earlier turns are rendered in the same format: an assistant's ``tool_calls`` as the JSON
object it would have produced, a ``tool`` message as a user turn holding a
``{"tool_response": ...}`` object, so any template (and the Camelidae fallback, which only
knows system, user and assistant) can show them.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from pesc_serve.engine.structured_output import lark_json, schema_error

MAX_TOOLS = 128
CALLS_PREFIX = '{"tool_calls": ['
RESPONSE_PREFIX = '{"response": "'
NAME_PREFIX = '{"name": "'
ARGUMENTS_INFIX = '", "arguments": '
# Hermes-style blocks (Qwen2.5's and NousResearch's templates ask for them)
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_OPEN_LARK, CALL_CLOSE_LARK = "<tool_call>\\n", "\\n</tool_call>"
_NATIVE_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ToolError(ValueError):
    """A bad ``tools``/``tool_choice``/tool message; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        """What the prompt shows of the tool."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = self.parameters
        return out


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON text, as OpenAI sends it

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def parse_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> "ToolPlan | None":
    """Check ``tools`` and ``tool_choice`` (pydantic has checked their shapes) and say how to
    decode; None when the request does not use tools (an empty list offers none, as vLLM reads it)."""
    if not tools:
        if tool_choice is not None:
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    parsed: list[Tool] = []
    seen: set[str] = set()
    for i, t in enumerate(tools):
        fn = t.function
        where = f"tools[{i}].function"
        if fn.name in seen:
            raise ToolError(f"two tools are named {fn.name!r}", f"{where}.name")
        seen.add(fn.name)
        params = fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
        if params.get("type", "object") != "object":
            raise ToolError("a tool's parameters must be a JSON schema of type object", f"{where}.parameters")
        problem = schema_error(params)
        if problem is not None:
            raise ToolError(f"parameters is not a usable JSON schema: {problem}", f"{where}.parameters")
        parsed.append(Tool(fn.name, fn.description or "", params))
    parallel = parallel_tool_calls is not False
    if tool_choice is None or isinstance(tool_choice, str):
        return ToolPlan(parsed, tool_choice or "auto", parallel)
    name = tool_choice.function.name
    if name not in seen:
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return ToolPlan(parsed, name, parallel, named=True)


@dataclass
class ToolPlan:
    """How one request uses its tools."""

    tools: list[Tool]
    choice: str  # "none", "auto", "required", or the named function
    parallel: bool = True
    named: bool = False
    native: bool = False  # the chat template takes ``tools``: Hermes-style <tool_call> blocks instead

    def template_tools(self) -> list[dict[str, Any]]:
        """The ``tools`` a template that takes them gets (OpenAI's shape)."""
        return [{"type": "function", "function": t.spec()} for t in self.callable_tools()]

    def native_grammar(self) -> str | None:
        """The Lark grammar of ``<tool_call>`` blocks for ``required`` and a named function; None
        for ``auto`` (the model may answer in text; calls are parsed from the reply)."""
        if not self.calls_only:
            return None
        variants = [self._call_schema(t) for t in self.callable_tools()]
        call = lark_json(variants[0] if len(variants) == 1 else {"anyOf": variants})
        start = "start: call" if self.named or not self.parallel else 'start: call ("\\n" call)*'
        return f'{start}\ncall: "{CALL_OPEN_LARK}" {call} "{CALL_CLOSE_LARK}"\n'

    @staticmethod
    def _call_schema(t: Tool) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    def stream_parser(self) -> "ToolStreamParser | NativeStreamParser":
        return NativeStreamParser() if self.native else ToolStreamParser()

    @property
    def active(self) -> bool:
        """Whether the tools are offered at all (``none`` decodes plain text without them)."""
        return self.choice != "none" or self.named

    @property
    def calls_only(self) -> bool:
        return self.named or self.choice == "required"

    def callable_tools(self) -> list[Tool]:
        return [t for t in self.tools if t.name == self.choice] if self.named else self.tools

    def output_schema(self) -> dict[str, Any]:
        """The JSON schema that constrains the reply."""
        call_variants = [self._call_schema(t) for t in self.callable_tools()]
        calls: dict[str, Any] = {
            "type": "array",
            "items": call_variants[0] if len(call_variants) == 1 else {"anyOf": call_variants},
            "minItems": 1,
        }
        if self.named or not self.parallel:
            calls["maxItems"] = 1
        call_object = {
            "type": "object",
            "properties": {"tool_calls": calls},
            "required": ["tool_calls"],
            "additionalProperties": False,
        }
        if self.calls_only:
            return call_object
        answer = {
            "type": "object",
            "properties": {"response": {"type": "string"}},
            "required": ["response"],
            "additionalProperties": False,
        }
        return {"anyOf": [call_object, answer]}

    def system_prompt(self) -> str:
        """The instructions and tool list the system message gains (short: every token of it is
        in every prompt, and the bundled model was trained on exactly this text)."""
        specs = "\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in self.callable_tools())
        call = '{"tool_calls": [{"name": ..., "arguments": {...}}]}'
        if self.calls_only:
            return f"Tools:\n{specs}\nCall a tool: reply {call}."
        return f"Tools:\n{specs}\nTo call tools, reply {call}. If no tool fits, reply {{\"response\": \"your answer\"}}."


def render_messages(messages: list[Any], plan: ToolPlan | None) -> list[dict[str, str]]:
    """Chat messages as plain role/content dicts for any template: tool calls and tool results
    in the generic format, the tool instructions appended to the (first) system message.

    Raises ToolError for a ``tool`` message whose ``tool_call_id`` answers no earlier call.
    """
    out: list[dict[str, str]] = []
    names_by_id: dict[str, str] = {}
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role == "assistant" and m.tool_calls:
            calls = []
            for c in m.tool_calls:
                names_by_id[c.id] = c.function.name
                calls.append({"name": c.function.name, "arguments": _arguments_value(c.function.arguments)})
            content = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            _check_tool_message(m, i, names_by_id)
            result = {"name": names_by_id[m.tool_call_id], "content": m.text}
            out.append({"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)})
        else:
            out.append({"role": role, "content": m.text})
    if plan is not None and plan.active:
        instructions = plan.system_prompt()
        for m in out:
            if m["role"] == "system":
                m["content"] = f"{m['content']}\n\n{instructions}" if m["content"] else instructions
                break
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def native_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages for a template that takes tools: assistant ``tool_calls`` (arguments as
    objects, as Hugging Face templates expect them) and ``tool`` turns passed through.  Raises
    ToolError for a ``tool`` message that answers no earlier call."""
    out: list[dict[str, Any]] = []
    ids: set[str] = set()
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role == "assistant" and m.tool_calls:
            ids.update(c.id for c in m.tool_calls)
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.function.name, "arguments": _arguments_value(c.function.arguments)}}
                     for c in m.tool_calls]
            out.append({"role": "assistant", "content": m.text, "tool_calls": calls})
        elif role == "tool":
            _check_tool_message(m, i, ids)
            out.append({"role": "tool", "content": m.text, "tool_call_id": m.tool_call_id})
        else:
            out.append({"role": role, "content": m.text})
    return out


def _check_tool_message(m: Any, i: int, ids: Any) -> None:
    if m.tool_call_id is None:
        raise ToolError("a tool message needs tool_call_id", f"messages[{i}].tool_call_id")
    if m.tool_call_id not in ids:
        raise ToolError(f"tool_call_id {m.tool_call_id!r} answers no earlier tool call", f"messages[{i}].tool_call_id")


def _arguments_value(arguments: str) -> Any:
    """An earlier call's arguments as the JSON value the model would have written."""
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


@dataclass
class ParsedReply:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


def parse_reply(text: str, plan: ToolPlan) -> ParsedReply:
    """The finished reply: its calls or its answer.  A reply max_tokens cut short keeps what
    had arrived, as a stream would have sent it: the answer's text so far, or the calls whose
    names are complete with their arguments' text so far."""
    if plan.native:
        return _parse_native(text)
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        return ParsedReply(None, [ToolCall(new_call_id(), c["name"], json.dumps(c["arguments"], ensure_ascii=False))
                                  for c in value["tool_calls"]])
    if isinstance(value, dict) and isinstance(value.get("response"), str):
        return ParsedReply(value["response"])
    if text.startswith(RESPONSE_PREFIX):
        return ParsedReply(_string_prefix(text, len(RESPONSE_PREFIX)))
    if text.startswith(CALLS_PREFIX):
        calls = [c for c in _scan_calls(text, len(CALLS_PREFIX)) if c.name is not None]
        return ParsedReply(None, [ToolCall(new_call_id(), c.name, c.arguments) for c in calls])
    return ParsedReply(text)


def _parse_native(text: str) -> ParsedReply:
    """``<tool_call>`` blocks holding ``{"name", "arguments"}``; the text around them is content.
    A block that does not parse stays in the content, as written."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for m in _NATIVE_BLOCK.finditer(text):
        call = _native_call(m.group(1))
        if call is None:
            continue
        kept.append(text[last : m.start()])
        last = m.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return ParsedReply(content or None, calls)


def _native_call(block: str) -> ToolCall | None:
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", {})
    return ToolCall(new_call_id(), value["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


class NativeStreamParser:
    """Streams a Hermes-style reply: text outside ``<tool_call>`` blocks as content (holding back
    what may be the start of a block), each block as one call delta once it closes."""

    def __init__(self) -> None:
        self.text = ""
        self._pos = 0
        self._inside = False
        self._calls = 0

    @property
    def is_call(self) -> bool:
        return self._calls > 0

    def feed(self, new_text: str) -> StreamDelta:
        self.text += new_text
        delta = StreamDelta()
        while True:
            if self._inside:
                end = self.text.find(CALL_CLOSE, self._pos)
                if end == -1:
                    break
                call = _native_call(self.text[self._pos : end].strip())
                if call is not None:
                    delta.tool_calls.append({"index": self._calls, **call.body()})
                    self._calls += 1
                self._pos, self._inside = end + len(CALL_CLOSE), False
                continue
            start = self.text.find(CALL_OPEN, self._pos)
            upto = start if start != -1 else len(self.text) - _held_prefix(self.text, self._pos, CALL_OPEN)
            piece = self.text[self._pos : upto]
            if piece and not (self.is_call and not piece.strip()):  # no stray newlines between calls
                delta.content += piece
            self._pos = upto
            if start == -1:
                break
            self._pos, self._inside = start + len(CALL_OPEN), True
        return delta

    def finish(self) -> str:
        """What is left when the reply ends: a held-back tail or an unclosed block, as content."""
        rest = self.text[self._pos :]
        self._pos = len(self.text)
        return (CALL_OPEN + rest) if self._inside else rest


def _held_prefix(text: str, start: int, marker: str) -> int:
    """Length of the longest tail of ``text[start:]`` that begins ``marker``."""
    for n in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if marker.startswith(text[len(text) - n :]):
            return n
    return 0


@dataclass
class _CallSoFar:
    name: str | None = None  # complete name, once its closing quote has arrived
    arguments: str = ""  # raw JSON text of the arguments so far
    complete: bool = False


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI delta.tool_calls entries


class ToolStreamParser:
    """Turns the streamed text of a generic-format reply into OpenAI deltas: the answer's text
    as ``content``; each call's ``id``, ``type`` and ``function.name`` once, then its
    ``arguments`` as fragments of the raw JSON text (they concatenate to the final arguments).

    The text is rescanned on every step (replies are short); nothing of the JSON wrapper ever
    reaches ``content``.
    """

    def __init__(self) -> None:
        self.text = ""
        self.ids: list[str] = []
        self._sent_names = 0
        self._sent_args: list[int] = []
        self._sent_content = 0

    def feed(self, new_text: str) -> StreamDelta:
        self.text += new_text
        delta = StreamDelta()
        if self.text.startswith(RESPONSE_PREFIX):
            answer = _string_prefix(self.text, len(RESPONSE_PREFIX))
            delta.content = answer[self._sent_content:]
            self._sent_content = len(answer)
        elif self.text.startswith(CALLS_PREFIX):
            for i, call in enumerate(_scan_calls(self.text, len(CALLS_PREFIX))):
                if call.name is None:
                    break
                if i >= self._sent_names:
                    self.ids.append(new_call_id())
                    self._sent_args.append(0)
                    delta.tool_calls.append({"index": i, "id": self.ids[i], "type": "function",
                                             "function": {"name": call.name, "arguments": ""}})
                    self._sent_names = i + 1
                fresh = call.arguments[self._sent_args[i]:]
                if fresh:
                    delta.tool_calls.append({"index": i, "function": {"arguments": fresh}})
                    self._sent_args[i] = len(call.arguments)
        return delta

    @property
    def is_call(self) -> bool:
        return self.text.startswith(CALLS_PREFIX)

    def finish(self) -> str:
        """When the reply ends: text that never became either form (max_tokens cut it) as content."""
        if self.is_call or self.text.startswith(RESPONSE_PREFIX) or self._sent_content:
            return ""
        return self.text


def _string_prefix(text: str, start: int) -> str:
    """The decoded characters of the JSON string starting at ``start`` (after its quote), up to
    its closing quote or the last complete escape."""
    out: list[str] = []
    i = start
    while i < len(text):
        ch = text[i]
        if ch == '"':
            break
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= len(text):
            break
        if text[i + 1] == "u":
            if i + 6 > len(text):
                break
            code = int(text[i + 2 : i + 6], 16)
            if 0xD800 <= code < 0xDC00:  # a surrogate pair: wait for its second half
                if i + 12 > len(text):
                    break
                low = int(text[i + 8 : i + 12], 16)
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                i += 12
                continue
            out.append(chr(code))
            i += 6
            continue
        out.append(json.loads(f'"{text[i:i + 2]}"'))
        i += 2
    return "".join(out)


def _value_end(text: str, start: int) -> int | None:
    """Index just past the JSON value starting at ``start``, or None if it is not complete yet."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1
            continue
        if ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and ch in ",}] ":
            return i
    return None


def _scan_calls(text: str, pos: int) -> list[_CallSoFar]:
    """The calls of ``{"tool_calls": [`` text from ``pos`` on, as far as they have arrived."""
    calls: list[_CallSoFar] = []
    while text.startswith(NAME_PREFIX, pos):
        call = _CallSoFar()
        calls.append(call)
        name_start = pos + len(NAME_PREFIX)
        close = text.find('"', name_start)
        if close == -1 or not text.startswith(ARGUMENTS_INFIX, close):
            return calls  # the name (or what follows it) is still arriving
        call.name = text[name_start:close]
        args_start = close + len(ARGUMENTS_INFIX)
        end = _value_end(text, args_start)
        if end is None:
            call.arguments = text[args_start:]
            return calls
        call.arguments = text[args_start:end]
        call.complete = True
        pos = end + 1  # past the call's closing brace
        if text.startswith(", ", pos):
            pos += 2
    return calls
