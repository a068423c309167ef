"""``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

Each handler turns a validated request into one engine request per (prompt, choice),
merges their output streams, and returns either one JSON body or an SSE stream ending in
``data: [DONE]``.  Errors known before the first byte get a proper HTTP status; errors
after that arrive as an ``{"error": ...}`` event.  Leaving early (disconnect, timeout)
closes the engine streams, which aborts the requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from pesc_serve.config import ServerConfig
from pesc_serve.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError, RequestStream
from pesc_serve.engine.request import RequestOutput, SamplingParams
from pesc_serve.server.chat import ChatFormatter
from pesc_serve.server.errors import APIError, error_body, param_of
from pesc_serve.server.metrics import ServerMetrics
from pesc_serve.server.protocol import ChatCompletionRequest, CompletionRequest
from pesc_serve.server.responses import (
    ChoiceState,
    TokenText,
    chat_logprobs,
    chunk_envelope,
    completion_logprobs,
    new_id,
    now,
    openai_finish_reason,
    usage,
)

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
SSE_PING_S = 15


@dataclasses.dataclass
class _Choice:
    index: int
    prompt_ids: list[int]
    stream: RequestStream
    started: float


class OpenAIServing:
    """The request handlers, bound to one engine and one served model name."""

    def __init__(
        self,
        engine: AsyncEngine,
        formatter: ChatFormatter,
        model_name: str,
        cfg: ServerConfig,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.formatter = formatter
        self.model_name = model_name
        self.cfg = cfg
        self.metrics = metrics
        self.text_of = TokenText(engine.tokenizer)
        self.created = now()

    # ---- shared plumbing ----------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:  # absent or empty: the one served model
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    def start(self, prompts: list[list[int]], params: SamplingParams, n: int, base_id: str) -> list[_Choice]:
        """Open one engine stream per (prompt, choice); all-or-nothing."""
        choices: list[_Choice] = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(n):
                    index = p * n + j
                    ps = params if params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                    stream = self.engine.add_request(f"{base_id}-{index}", ids, ps)
                    choices.append(_Choice(index, ids, stream, time.monotonic()))
        except EngineOverloadedError as exc:
            self._close(choices)
            raise APIError(429, str(exc), code="server_overloaded", headers={"Retry-After": RETRY_AFTER_S}) from None
        except EngineDeadError as exc:
            self._close(choices)
            raise APIError(503, str(exc), code="engine_dead") from None
        except ValueError as exc:
            self._close(choices)
            raise APIError(400, str(exc), param_of(str(exc)), "invalid_value") from None
        if self.metrics is not None:
            for c in choices:
                self.metrics.on_start(c.stream.request_id)
        return choices

    @staticmethod
    def _close(choices: list[_Choice]) -> None:
        for c in choices:
            c.stream.close()

    async def merged(self, choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
        """Outputs of all choices as they come; closes every stream on exit."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice) -> None:
            try:
                async for out in c.stream:
                    q.put_nowait((c, out))
            except BaseException as exc:  # engine death etc.: surface it to the consumer
                q.put_nowait((c, exc))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        remaining = len(choices)
        deadline = None if self.cfg.request_timeout_s is None else time.monotonic() + self.cfg.request_timeout_s
        try:
            while remaining:
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
                try:
                    c, item = await asyncio.wait_for(q.get(), timeout)
                except asyncio.TimeoutError:
                    raise APIError(504, f"request timed out after {self.cfg.request_timeout_s} s", code="timeout") from None
                if isinstance(item, BaseException):
                    raise APIError(503, f"the engine stopped: {item}", code="engine_dead")
                if self.metrics is not None:
                    self.metrics.on_output(c.stream.request_id, item)
                if item.finished:
                    remaining -= 1
                yield c, item
        finally:
            for t in tasks:
                t.cancel()
            self._close(choices)
            if self.metrics is not None:
                for c in choices:
                    self.metrics.on_close(c.stream.request_id)

    async def until_disconnect(self, raw: Request, coro) -> Any:
        """Run ``coro``; cancel it (aborting its requests) as soon as the client goes away.

        The body has been read by now, so the next ASGI message can only be the disconnect.
        """
        task = asyncio.ensure_future(coro)
        listener = asyncio.ensure_future(_wait_for_disconnect(raw))
        try:
            await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listener.cancel()
            if not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if not task.cancelled():
            return task.result()
        raise APIError(499, "client disconnected", code="client_closed_request")

    def sse(self, events: AsyncGenerator[dict, None]) -> EventSourceResponse:
        """Stream ``events``; errors after the headers become an ``{"error": ...}`` event.

        ``events`` is closed explicitly however the stream ends (a disconnect cancels us at
        any ``await`` or ``yield``), so its engine requests are aborted at once rather than
        when the garbage collector finds the generator.  On shutdown a running stream gets
        ``shutdown_timeout_s`` to finish before sse-starlette cuts it.
        """

        async def gen() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield json.dumps(event, ensure_ascii=False, separators=(",", ":"))
            except APIError as exc:
                yield json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))
            except Exception as exc:
                logger.exception("stream failed")
                yield json.dumps(error_body(500, f"internal error: {type(exc).__name__}", code="internal_error"))
            finally:
                await events.aclose()
            yield "[DONE]"

        return EventSourceResponse(
            gen(), sep="\n", ping=SSE_PING_S, shutdown_grace_period=self.cfg.shutdown_timeout_s
        )

    # ---- chat ---------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Any:
        self.check_model(req.model)
        params = _params(req)
        try:
            text = self.formatter.render(req.messages, req.add_generation_prompt, **(req.chat_template_kwargs or {}))
        except ValueError as exc:
            raise APIError(400, str(exc), "messages", "invalid_value") from None
        prompt_ids = self.formatter.encode(text)
        choices = self.start([prompt_ids], params, req.n, new_id("chatcmpl"))
        obj_id = choices[0].stream.request_id.rsplit("-", 1)[0]
        if req.stream:
            return self.sse(self._chat_events(obj_id, choices, req))
        states = await self.until_disconnect(raw, self._collect(choices))
        body_choices = []
        for s in states:
            body_choices.append(
                {
                    "index": s.index,
                    "message": {"role": "assistant", "content": s.text},
                    "logprobs": {"content": chat_logprobs(s.logprobs, self.text_of)} if req.logprobs else None,
                    "finish_reason": openai_finish_reason(s.finish_reason),
                    "stop_reason": s.stop_reason,
                }
            )
        return JSONResponse(
            {
                "id": obj_id,
                "object": "chat.completion",
                "created": now(),
                "model": self.model_name,
                "choices": body_choices,
                "usage": _usage(states, req.n),
            }
        )

    async def _chat_events(self, obj_id: str, choices: list[_Choice], req: ChatCompletionRequest) -> AsyncIterator[dict]:
        created = now()
        states = {c.index: ChoiceState(c.index) for c in choices}

        def chunk(choices_: list[dict], usage_: dict | None = None) -> dict:
            return chunk_envelope(obj_id, "chat.completion.chunk", created, self.model_name, choices_, usage_)

        for c in choices:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        async with aclosing(self.merged(choices)) as outputs:
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
                            "logprobs": {"content": chat_logprobs(out.logprobs, self.text_of)} if req.logprobs else None,
                            "finish_reason": openai_finish_reason(out.finish_reason) if out.finished else None,
                        }
                    ]
                )
        if req.include_usage:
            yield chunk([], _usage(list(states.values()), req.n))

    async def _collect(self, choices: list[_Choice]) -> list[ChoiceState]:
        states = {c.index: ChoiceState(c.index) for c in choices}
        async with aclosing(self.merged(choices)) as outputs:
            async for c, out in outputs:
                states[c.index].add(out)
                if out.error:
                    raise APIError(500, out.error, code="engine_error")
        return [states[i] for i in sorted(states)]

    # ---- text completions ---------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, raw: Request) -> Any:
        self.check_model(req.model)
        params = _params(req)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", "echo", "unsupported")
        prompts = [self.formatter.encode_completion_prompt(p) if isinstance(p, str) else list(p) for p in req.prompt_list()]
        if any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        choices = self.start(prompts, params, req.n, new_id("cmpl"))
        obj_id = choices[0].stream.request_id.rsplit("-", 1)[0]
        echo = {c.index: self._echo_text(req, c.prompt_ids) for c in choices}
        if req.stream:
            return self.sse(self._completion_events(obj_id, choices, req, echo))
        states = await self.until_disconnect(raw, self._collect(choices))
        body_choices = [
            {
                "index": s.index,
                "text": echo[s.index] + s.text,
                "logprobs": completion_logprobs(s.logprobs, self.text_of, 0) if req.logprobs is not None else None,
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
                "model": self.model_name,
                "choices": body_choices,
                "usage": _usage(states, req.n),
            }
        )

    def _echo_text(self, req: CompletionRequest, prompt_ids: list[int]) -> str:
        return self.engine.tokenizer.decode(prompt_ids, skip_special_tokens=False) if req.echo else ""

    async def _completion_events(
        self, obj_id: str, choices: list[_Choice], req: CompletionRequest, echo: dict[int, str]
    ) -> AsyncIterator[dict]:
        created = now()
        states = {c.index: ChoiceState(c.index) for c in choices}
        offsets = {c.index: 0 for c in choices}
        async with aclosing(self.merged(choices)) as outputs:
            async for c, out in outputs:
                states[c.index].add(out)
                if out.error:
                    raise APIError(500, out.error, code="engine_error")
                text = echo.pop(c.index, "") + out.new_text
                if not (text or out.finished or (req.logprobs is not None and out.logprobs)):
                    continue
                logprobs = None
                if req.logprobs is not None:
                    logprobs = completion_logprobs(out.logprobs, self.text_of, offsets[c.index])
                    offsets[c.index] += sum(len(t) for t in logprobs["tokens"])
                yield chunk_envelope(
                    obj_id,
                    "text_completion",
                    created,
                    self.model_name,
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
            yield chunk_envelope(obj_id, "text_completion", created, self.model_name, [], _usage(list(states.values()), req.n))

    # ---- models -------------------------------------------------------------------------

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "pesc-serve",
                    "root": self.model_name,
                    "parent": None,
                    "max_model_len": self.engine.max_model_len,
                }
            ],
        }


def _params(req: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    try:
        return req.sampling_params()
    except ValueError as exc:
        raise APIError(400, str(exc), param_of(str(exc)), "invalid_value") from None


def _usage(states: list[ChoiceState], n: int) -> dict:
    """Prompt tokens count once per prompt (not per choice), as OpenAI bills them."""
    prompt = sum(s.num_prompt_tokens for s in states if s.index % n == 0)
    cached = sum(s.num_cached_tokens for s in states if s.index % n == 0)
    return usage(prompt, sum(len(s.token_ids) for s in states), cached)


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def build_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Any:
        return await serving.chat(body, raw)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Any:
        return await serving.completions(body, raw)

    @router.get("/v1/models")
    async def models() -> dict:
        return serving.models()

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        serving.check_model(model_id)
        return serving.models()["data"][0]

    return router

