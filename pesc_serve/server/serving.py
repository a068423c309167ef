"""The shared plumbing of the OpenAI endpoints: engine streams per choice, merging, limits.

A handler turns a validated request into one engine request per (prompt, choice), merges
their output streams, and returns either one JSON body or an SSE stream ending in
``data: [DONE]``.  Errors known before the first byte get a proper HTTP status; errors
after that arrive as an ``{"error": ...}`` event.  Leaving early (disconnect, timeout)
closes the engine streams, which aborts the requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from pesc_serve.config import ServerConfig
from pesc_serve.deltas.served_models import ServedModel, UnknownModelError
from pesc_serve.engine.async_engine import (
    ANSWER_GRACE_S,
    AsyncEngine,
    EngineDeadError,
    EngineDrainingError,
    EngineOverloadedError,
    RequestStream,
)
from pesc_serve.engine.request import RequestOutput, SamplingParams
from pesc_serve.server.chat import ChatFormatter, ChatTemplateError
from pesc_serve.server.errors import APIError, error_body, param_of
from pesc_serve.server.metrics import ServerMetrics
from pesc_serve.server.protocol import ChatCompletionRequest, CompletionRequest
from pesc_serve.server.responses import ChoiceState, TokenText, new_id, now, usage
from pesc_serve.server.tools import ToolError, ToolPlan

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SSE_PING_S = 15

# Characters that str.splitlines() and httpx's iter_lines() treat as line breaks although
# SSE does not; JSON leaves them raw with ensure_ascii=False, so a token that decodes to one
# would split an event in two for such clients.  Escaping keeps the same decoded text.
_LINE_BREAKS_TO_ESCAPE = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(event: dict) -> str:
    """One SSE data payload: compact UTF-8 JSON that no line splitter breaks apart."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS_TO_ESCAPE)

@dataclasses.dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    stream: RequestStream
    started: float
    model: str  # the served model name it runs (what responses report)
class OpenAIServing:
    """What every endpoint shares, bound to one engine and one served model name."""

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

    @staticmethod
    def request_id(raw: Request, prefix: str) -> str:
        """``prefix-<X-Request-Id>`` when the client sends one (checked), else a fresh uuid."""
        given = raw.headers.get("x-request-id")
        if given is None:
            return new_id(prefix)
        if not _REQUEST_ID.fullmatch(given):
            raise APIError(400, "X-Request-Id must be 1-128 characters of letters, digits and ._:-",
                           "X-Request-Id", "invalid_value")
        return f"{prefix}-{given}"

    def check_model(self, model: str | None) -> str:
        """The served name ``model`` resolves to (absent or empty: the --model); 404 if none."""
        try:
            return self.engine.engine.models.get(model).name
        except UnknownModelError as exc:
            raise APIError(404, str(exc), "model", "model_not_found") from None

    def chat_prompt(self, messages: list, add_generation_prompt: bool, tool_plan: ToolPlan | None,
                    template_kwargs: dict[str, Any] | None) -> list[int]:
        """Token ids of chat ``messages`` as the chat template renders them (with ``tool_plan``'s
        tools); a bad message or tool input is a 400 naming its field, a broken template a 500."""
        try:
            text = self.formatter.render(messages, add_generation_prompt, tool_plan, **(template_kwargs or {}))
        except ToolError as exc:
            raise APIError(400, str(exc), exc.param, "invalid_value") from None
        except ValueError as exc:
            raise APIError(400, str(exc), "messages", "invalid_value") from None
        except ChatTemplateError as exc:
            raise APIError(500, str(exc), code="chat_template_error") from None
        return self.formatter.encode(text)  # a rendered template carries its own special tokens

    def start(
        self, prompts: list[list[int]], params: SamplingParams, n: int, base_id: str, prompt_param: str = "prompt",
        model: str | None = None,
    ) -> list[Choice]:
        """Open one engine stream per (prompt, choice); all-or-nothing.  ``prompt_param`` is the
        request field a bad prompt is blamed on (``messages`` for chat)."""
        choices: list[Choice] = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(n):
                    index = p * n + j
                    ps = params if params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                    stream = self.engine.add_request(f"{base_id}-{index}", ids, ps, model)
                    choices.append(Choice(index, ids, stream, time.monotonic(), model or self.model_name))
        except EngineOverloadedError as exc:
            self._close(choices)
            raise APIError(429, str(exc), code="server_overloaded", headers={"Retry-After": RETRY_AFTER_S}) from None
        except EngineDeadError as exc:
            self._close(choices)
            raise APIError(503, str(exc), code="engine_dead") from None
        except EngineDrainingError as exc:
            self._close(choices)
            raise APIError(503, str(exc), code="shutting_down", headers={"Retry-After": RETRY_AFTER_S}) from None
        except UnknownModelError as exc:  # unloaded between the check and now
            self._close(choices)
            raise APIError(404, str(exc), "model", "model_not_found") from None
        except ValueError as exc:
            self._close(choices)
            if "already in use" in str(exc):
                raise APIError(400, f"a request with X-Request-Id {base_id!r} is already in flight",
                               "X-Request-Id", "invalid_value") from None
            param = param_of(exc)
            raise APIError(400, str(exc), prompt_param if param == "prompt" else param, "invalid_value") from None
        for c in choices:
            self._metric("on_start", c.stream.request_id, c.model)
        return choices

    def _metric(self, hook: str, *args: Any) -> None:
        """Tell the metrics; their failure is logged, never the request's."""
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, hook)(*args)
        except Exception:
            logger.exception("metrics hook %s failed (the request goes on)", hook)

    @staticmethod
    def _close(choices: list[Choice]) -> None:
        for c in choices:
            c.stream.close()

    async def merged(self, choices: list[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Outputs of all choices as they come; closes every stream on exit."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice) -> None:
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
                    raise APIError(
                        504, f"request timed out after {self.cfg.request_timeout_s} s", code="timeout"
                    ) from None
                if isinstance(item, BaseException):
                    raise APIError(503, f"the engine stopped: {item}", code="engine_dead")
                self._metric("on_output", c.stream.request_id, item)
                if item.finished:
                    remaining -= 1
                yield c, item
        finally:
            for t in tasks:
                t.cancel()
            self._close(choices)
            for c in choices:
                self._metric("on_close", c.stream.request_id)

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
        when the garbage collector finds the generator.  On shutdown the engine aborts a
        stream still running after ``shutdown_timeout_s`` with a final ``abort`` chunk;
        sse-starlette would cut it only after a further grace period.
        """

        async def gen() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield sse_json(event)
            except APIError as exc:
                yield json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))
            except Exception as exc:
                logger.exception("stream failed")
                yield json.dumps(error_body(500, f"internal error: {type(exc).__name__}", code="internal_error"))
            finally:
                await events.aclose()
            yield "[DONE]"

        return EventSourceResponse(gen(), sep="\n", ping=SSE_PING_S, shutdown_grace_period=self.cfg.shutdown_timeout_s + ANSWER_GRACE_S)

    async def collect(self, choices: list[Choice]) -> list[ChoiceState]:
        states = {c.index: ChoiceState(c.index) for c in choices}
        async with aclosing(self.merged(choices)) as outputs:
            async for c, out in outputs:
                states[c.index].add(out)
                if out.error:
                    raise APIError(500, out.error, code="engine_error")
        return [states[i] for i in sorted(states)]

    # ---- models -------------------------------------------------------------------------

    def models(self) -> dict:
        """Every served model; a delta names its base in ``parent`` (vLLM's convention)."""
        return {"object": "list", "data": [self._card(m) for m in self.engine.engine.models.listed()]}

    def model_card(self, name: str) -> dict:
        return self._card(self.engine.engine.models.get(self.check_model(name)))

    def _card(self, model: ServedModel) -> dict:
        return {
            "id": model.name,
            "object": "model",
            "created": self.created,
            "owned_by": "pesc-serve",
            "root": str(model.source.path) if model.source is not None else model.name,
            "parent": model.parent,
            "max_model_len": self.engine.max_model_len,
        }
def request_params(req: ChatCompletionRequest | CompletionRequest, *args: Any) -> SamplingParams:
    try:
        return req.sampling_params(*args)
    except ValueError as exc:
        raise APIError(400, str(exc), param_of(exc), "invalid_value") from None
def usage_of(states: list[ChoiceState], n: int) -> dict:
    """Prompt tokens count once per prompt (not per choice), as OpenAI bills them."""
    prompt = sum(s.num_prompt_tokens for s in states if s.index % n == 0)
    cached = sum(s.num_cached_tokens for s in states if s.index % n == 0)
    return usage(prompt, sum(len(s.token_ids) for s in states), cached)
async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass
