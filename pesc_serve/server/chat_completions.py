"""``POST /v1/chat/completions``: chat template -> engine streams -> body or SSE chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from pesc_serve.server.errors import APIError
from pesc_serve.server.protocol import ChatCompletionRequest
from pesc_serve.server.responses import (
    ChoiceState,
    chat_logprobs,
    chunk_envelope,
    now,
    openai_finish_reason,
    prompt_logprobs_body,
)
from pesc_serve.server.serving import OpenAIServing, Choice, request_params, usage_of
from pesc_serve.server.tools import NativeStreamParser, ToolError, ToolPlan, ToolStreamParser, parse_reply


async def create_chat_completion(serving: OpenAIServing, req: ChatCompletionRequest, raw: Request) -> Any:
    model = serving.check_model(req.model)
    try:
        plan = req.tool_plan(native=serving.formatter.takes_tools)
    except ToolError as exc:
        raise APIError(400, str(exc), exc.param, "invalid_value") from None
    params = request_params(req, plan)
    prompt_ids = serving.chat_prompt(req.messages, req.add_generation_prompt, plan, req.chat_template_kwargs)
    choices = serving.start([prompt_ids], params, req.n, serving.request_id(raw, "chatcmpl"), prompt_param="messages",
                            model=model)
    obj_id = choices[0].stream.request_id.rsplit("-", 1)[0]
    tools = plan if plan is not None and plan.active else None
    if req.stream:
        return serving.sse(_chat_events(serving, obj_id, choices, req, tools))
    states = await serving.until_disconnect(raw, serving.collect(choices))
    body_choices = []
    for s in states:
        message: dict[str, Any] = {"role": "assistant", "content": s.text}
        finish_reason = openai_finish_reason(s.finish_reason)
        if tools is not None:
            reply = parse_reply(s.text, tools)
            message["content"] = reply.content
            if reply.tool_calls:
                message["tool_calls"] = [c.body() for c in reply.tool_calls]
                finish_reason = tool_finish_reason(tools, finish_reason)
        body_choices.append(
            {
                "index": s.index,
                "message": message,
                "logprobs": {"content": chat_logprobs(s.logprobs, serving.text_of)} if req.logprobs else None,
                "finish_reason": finish_reason,
                "stop_reason": s.stop_reason,
                **({"prompt_logprobs": prompt_logprobs_body(s.prompt_logprobs, serving.text_of)}
                   if req.prompt_logprobs is not None else {}),
            }
        )
    return JSONResponse(
        {
            "id": obj_id,
            "object": "chat.completion",
            "created": now(),
            "model": model,
            "choices": body_choices,
            "usage": usage_of(states, req.n),
        }
    )


def tool_finish_reason(plan: ToolPlan, finish_reason: str | None) -> str | None:
    """A completed call ends with ``tool_calls`` for auto and required; for a named function
    OpenAI reports ``stop``, and so do we."""
    if finish_reason != "stop":
        return finish_reason
    return "stop" if plan.named else "tool_calls"


async def _chat_events(
    serving: OpenAIServing, obj_id: str, choices: list[Choice], req: ChatCompletionRequest, tools: ToolPlan | None
) -> AsyncIterator[dict]:
    created = now()
    states = {c.index: ChoiceState(c.index) for c in choices}
    parsers = {c.index: tools.stream_parser() for c in choices} if tools is not None else {}

    def chunk(choices_: list[dict], usage_: dict | None = None) -> dict:
        return chunk_envelope(obj_id, "chat.completion.chunk", created, choices[0].model, choices_, usage_)

    for c in choices:
        yield chunk(
            [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )
    async with aclosing(serving.merged(choices)) as outputs:
        async for c, out in outputs:
            states[c.index].add(out)
            if out.error:
                raise APIError(500, out.error, code="engine_error")
            finish_reason = openai_finish_reason(out.finish_reason) if out.finished else None
            if tools is not None:
                delta = _tool_delta(parsers[c.index], out.new_text, out.finished)
                if finish_reason is not None and parsers[c.index].is_call:
                    finish_reason = tool_finish_reason(tools, finish_reason)
            else:
                delta = {"content": out.new_text} if out.new_text or not out.finished else {}
            scored = req.prompt_logprobs is not None and out.prompt_logprobs is not None
            if not (delta or out.finished or scored or (req.logprobs and out.logprobs)):
                continue
            choice = {
                "index": c.index,
                "delta": delta,
                "logprobs": {"content": chat_logprobs(out.logprobs, serving.text_of)} if req.logprobs else None,
                "finish_reason": finish_reason,
            }
            if scored:  # the request's first output: the prompt's scores, once
                choice["prompt_logprobs"] = prompt_logprobs_body(out.prompt_logprobs, serving.text_of)
            yield chunk([choice])
    if req.include_usage:
        yield chunk([], usage_of(list(states.values()), req.n))


def _tool_delta(parser: ToolStreamParser | NativeStreamParser, new_text: str, finished: bool) -> dict:
    """The OpenAI delta for new text of a reply in a tool format: answer text as content, calls
    as ``tool_calls`` entries; at the end, whatever never became either (max_tokens cut it)
    goes out as content, as the non-streamed body has it."""
    step = parser.feed(new_text)
    delta: dict[str, Any] = {}
    content = step.content + (parser.finish() if finished else "")
    if content:
        delta["content"] = content
    if step.tool_calls:
        delta["tool_calls"] = step.tool_calls
    return delta
