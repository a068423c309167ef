"""``POST /v1/completions``: prompts (text or token ids, batched) -> engine streams -> body or SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from pesc_serve.server.errors import APIError
from pesc_serve.server.protocol import CompletionRequest
from pesc_serve.server.responses import (
    ChoiceState,
    chunk_envelope,
    completion_logprobs,
    echo_logprobs,
    joined_logprobs,
    now,
    openai_finish_reason,
    prompt_logprobs_body,
    text_length,
)
from pesc_serve.server.serving import OpenAIServing, Choice, request_params, usage_of


async def create_completion(serving: OpenAIServing, req: CompletionRequest, raw: Request) -> Any:
    model = serving.check_model(req.model)
    params = request_params(req)
    prompts = [
        serving.formatter.encode_completion_prompt(p) if isinstance(p, str) else list(p) for p in req.prompt_list()
    ]
    if any(not p for p in prompts):
        raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
    choices = serving.start(prompts, params, req.n, serving.request_id(raw, "cmpl"), model=model)
    obj_id = choices[0].stream.request_id.rsplit("-", 1)[0]
    echo = {c.index: _echo_text(serving, req, c.prompt_ids) for c in choices}
    if req.stream:
        return serving.sse(_completion_events(serving, obj_id, choices, req, echo))
    states = await serving.until_disconnect(raw, serving.collect(choices))
    prompts_of = {c.index: c.prompt_ids for c in choices}
    body_choices = []
    for s in states:
        choice = {
            "index": s.index,
            "text": echo[s.index] + s.text,
            "logprobs": _logprobs(serving, req, prompts_of[s.index], s.prompt_logprobs, s.logprobs, 0, first=True),
            "finish_reason": openai_finish_reason(s.finish_reason),
            "stop_reason": s.stop_reason,
        }
        if req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs_body(s.prompt_logprobs, serving.text_of)
        body_choices.append(choice)
    return JSONResponse(
        {
            "id": obj_id,
            "object": "text_completion",
            "created": now(),
            "model": model,
            "choices": body_choices,
            "usage": usage_of(states, req.n),
        }
    )


def _logprobs(serving: OpenAIServing, req: CompletionRequest, prompt_ids: list[int], prompt_scores, generated,
              offset: int, first: bool) -> dict | None:
    """The legacy ``logprobs`` object: under ``echo`` the prompt's tokens come first (in the
    first chunk of a stream), then the generated ones, offsets counted from the prompt's start."""
    if req.logprobs is None:
        return None
    if not (req.echo and first):
        return completion_logprobs(generated, serving.text_of, offset)
    head = echo_logprobs(prompt_ids, prompt_scores or [None] * len(prompt_ids), serving.text_of)
    end = sum(text_length(t) for t in head["tokens"])
    return joined_logprobs(head, completion_logprobs(generated, serving.text_of, end))


def _echo_text(serving: OpenAIServing, req: CompletionRequest, prompt_ids: list[int]) -> str:
    return serving.engine.tokenizer.decode(prompt_ids, skip_special_tokens=False) if req.echo else ""


async def _completion_events(
    serving: OpenAIServing, obj_id: str, choices: list[Choice], req: CompletionRequest, echo: dict[int, str]
) -> AsyncIterator[dict]:
    created = now()
    states = {c.index: ChoiceState(c.index) for c in choices}
    offsets = {c.index: 0 for c in choices}
    first = {c.index for c in choices}
    async with aclosing(serving.merged(choices)) as outputs:
        async for c, out in outputs:
            states[c.index].add(out)
            if out.error:
                raise APIError(500, out.error, code="engine_error")
            text = echo.pop(c.index, "") + out.new_text
            is_first = c.index in first
            first.discard(c.index)
            opening = is_first and (req.echo or req.prompt_logprobs is not None)  # carries the prompt's part
            if not (text or out.finished or opening or (req.logprobs is not None and out.logprobs)):
                continue
            logprobs = _logprobs(serving, req, c.prompt_ids, out.prompt_logprobs, out.logprobs, offsets[c.index],
                                 is_first)
            if logprobs is not None:
                offsets[c.index] = (logprobs["text_offset"][-1] + text_length(logprobs["tokens"][-1])
                                    if logprobs["tokens"] else offsets[c.index])
            choice = {
                "index": c.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": openai_finish_reason(out.finish_reason) if out.finished else None,
            }
            if req.prompt_logprobs is not None and is_first:
                choice["prompt_logprobs"] = prompt_logprobs_body(out.prompt_logprobs, serving.text_of)
            yield chunk_envelope(obj_id, "text_completion", created, choices[0].model, [choice])
    if req.include_usage:
        yield chunk_envelope(
            obj_id, "text_completion", created, choices[0].model, [], usage_of(list(states.values()), req.n)
        )
