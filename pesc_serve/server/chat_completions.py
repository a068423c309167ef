"""``POST /v1/chat/completions``: chat template -> engine streams -> body or SSE chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from pesc_serve.server.chat import ChatTemplateError
from pesc_serve.server.errors import APIError
from pesc_serve.server.protocol import ChatCompletionRequest
from pesc_serve.server.responses import ChoiceState, chat_logprobs, chunk_envelope, now, openai_finish_reason
from pesc_serve.server.serving import OpenAIServing, Choice, request_params, usage_of


async def create_chat_completion(serving: OpenAIServing, req: ChatCompletionRequest, raw: Request) -> Any:
    model = serving.check_model(req.model)
    params = request_params(req)
    try:
        text = serving.formatter.render(req.messages, req.add_generation_prompt, **(req.chat_template_kwargs or {}))
    except ValueError as exc:
        raise APIError(400, str(exc), "messages", "invalid_value") from None
    except ChatTemplateError as exc:
        raise APIError(500, str(exc), code="chat_template_error") from None
    prompt_ids = serving.formatter.encode(text)
    choices = serving.start([prompt_ids], params, req.n, serving.request_id(raw, "chatcmpl"), prompt_param="messages",
                            model=model)
    obj_id = choices[0].stream.request_id.rsplit("-", 1)[0]
    if req.stream:
        return serving.sse(_chat_events(serving, obj_id, choices, req))
    states = await serving.until_disconnect(raw, serving.collect(choices))
    body_choices = []
    for s in states:
        body_choices.append(
            {
                "index": s.index,
                "message": {"role": "assistant", "content": s.text},
                "logprobs": {"content": chat_logprobs(s.logprobs, serving.text_of)} if req.logprobs else None,
                "finish_reason": openai_finish_reason(s.finish_reason),
                "stop_reason": s.stop_reason,
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


async def _chat_events(
    serving: OpenAIServing, obj_id: str, choices: list[Choice], req: ChatCompletionRequest
) -> AsyncIterator[dict]:
    created = now()
    states = {c.index: ChoiceState(c.index) for c in choices}

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
            if not (out.new_text or out.finished or (req.logprobs and out.logprobs)):
                continue
            delta = {"content": out.new_text} if out.new_text or not out.finished else {}
            yield chunk(
                [
                    {
                        "index": c.index,
                        "delta": delta,
                        "logprobs": {"content": chat_logprobs(out.logprobs, serving.text_of)} if req.logprobs else None,
                        "finish_reason": openai_finish_reason(out.finish_reason) if out.finished else None,
                    }
                ]
            )
    if req.include_usage:
        yield chunk([], usage_of(list(states.values()), req.n))
