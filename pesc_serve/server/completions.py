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
    now,
    openai_finish_reason,
    text_length,
)
from pesc_serve.server.serving import OpenAIServing, Choice, request_params, usage_of


async def create_completion(serving: OpenAIServing, req: CompletionRequest, raw: Request) -> Any:
    model = serving.check_model(req.model)
    params = request_params(req)
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported", "echo", "unsupported")
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
    body_choices = [
        {
            "index": s.index,
            "text": echo[s.index] + s.text,
            "logprobs": completion_logprobs(s.logprobs, serving.text_of, 0) if req.logprobs is not None else None,
            "finish_reason": openai_finish_reason(s.finish_reason),
            "stop_reason": s.stop_reason,
        }
        for s in states
    ]
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


def _echo_text(serving: OpenAIServing, req: CompletionRequest, prompt_ids: list[int]) -> str:
    return serving.engine.tokenizer.decode(prompt_ids, skip_special_tokens=False) if req.echo else ""


async def _completion_events(
    serving: OpenAIServing, obj_id: str, choices: list[Choice], req: CompletionRequest, echo: dict[int, str]
) -> AsyncIterator[dict]:
    created = now()
    states = {c.index: ChoiceState(c.index) for c in choices}
    offsets = {c.index: 0 for c in choices}
    async with aclosing(serving.merged(choices)) as outputs:
        async for c, out in outputs:
            states[c.index].add(out)
            if out.error:
                raise APIError(500, out.error, code="engine_error")
            text = echo.pop(c.index, "") + out.new_text
            if not (text or out.finished or (req.logprobs is not None and out.logprobs)):
                continue
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(out.logprobs, serving.text_of, offsets[c.index])
                offsets[c.index] += sum(text_length(t) for t in logprobs["tokens"])
            yield chunk_envelope(
                obj_id,
                "text_completion",
                created,
                choices[0].model,
                [
                    {
                        "index": c.index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": openai_finish_reason(out.finish_reason) if out.finished else None,
                    }
                ],
            )
    if req.include_usage:
        yield chunk_envelope(
            obj_id, "text_completion", created, choices[0].model, [], usage_of(list(states.values()), req.n)
        )
