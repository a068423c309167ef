"""AsyncEngine: the engine client the HTTP layer talks to.

The model loop runs on the engine thread (engine_thread.py, the thread that also loaded the
model) so the event loop stays responsive.  Requests and
aborts travel to that thread through an inbox; each step's outputs come back in one
``call_soon_threadsafe`` and are fanned out to per-request asyncio queues.  A consumer
that stops listening (client disconnect, cancellation) aborts its request, which frees its
KV blocks before the next step.

Shutdown (:meth:`AsyncEngine.begin_drain`): new requests are refused at once, running ones
get the drain time to finish, and whatever is left is then aborted *with an answer*: its
consumer receives a last output with ``finish_reason`` abort, so a stream still ends with a
final chunk and a plain request still gets its partial completion.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from pesc_serve.engine.engine import EngineStats, LLMEngine
from pesc_serve.engine.engine_thread import EngineThread
from pesc_serve.engine.request import FinishReason, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


ANSWER_GRACE_S = 5.0  # after the drain, how long aborted requests get to hand their answers over


class EngineOverloadedError(RuntimeError):
    """Running and waiting requests are at their limits; the client should retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class EngineDrainingError(RuntimeError):
    """The server is shutting down: running requests finish, new ones are refused."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    model: str | None = None


@dataclass
class _Call:
    """Run ``fn(engine)`` on the engine thread between steps (delta load/unload)."""

    fn: Callable[[LLMEngine], Any]
    future: Future


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue_len: int = 256, thread: EngineThread | None = None) -> None:
        self.engine = engine
        self._engine_thread = thread
        self.max_queue_len = max_queue_len
        self._inbox: queue.Queue = queue.Queue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: Future | None = None
        self._stopping = threading.Event()
        self.dead_error: BaseException | None = None
        self._stats = engine.stats()
        self._draining = False
        self._drain_timer: asyncio.TimerHandle | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        if self._engine_thread is None:
            self._engine_thread = EngineThread()
        self._running = self._engine_thread.submit(self._run)

    def begin_drain(self, drain_timeout_s: float) -> None:
        """Refuse new requests; abort (with an answer) those still running after the timeout.

        Runs on the event loop; idempotent, so a second signal does not restart the clock.
        """
        if self._draining:
            return
        self._draining = True
        loop = self._loop or asyncio.get_running_loop()
        logger.info("draining: %d request(s) in flight get %.1f s to finish", len(self._queues), drain_timeout_s)
        self._drain_timer = loop.call_later(drain_timeout_s, self.abort_all)

    def abort_all(self) -> None:
        """Abort every request in flight; each consumer still gets a final ``abort`` output."""
        if self._queues:
            logger.warning("drain time is over: aborting %d request(s)", len(self._queues))
        for request_id in list(self._queues):
            self.abort(request_id)

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Drain (if no signal began it already), wait for the answers, stop the engine thread."""
        self.begin_drain(drain_timeout_s)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + drain_timeout_s + ANSWER_GRACE_S  # a consumer that never reads its answer
        while self._queues and self.is_healthy and loop.time() < give_up:
            await asyncio.sleep(0.05)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._stopping.set()
        self._inbox.put(None)
        if self._running is not None:
            await loop.run_in_executor(None, concurrent.futures.wait, [self._running], 10.0)
        if self._engine_thread is not None:
            self._engine_thread.stop()
        self.engine.models.close()  # the delta loader thread, if one was started

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None and self._running is not None and not self._running.done()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def stats(self) -> EngineStats:
        """Counts as of the last step (read without locking the engine thread)."""
        return self._stats

    # ---- requests ----------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise EngineOverloadedError when running + waiting requests are at their limits."""
        limit = self.engine.config.max_num_seqs + self.max_queue_len
        if len(self._queues) >= limit:
            raise EngineOverloadedError(
                f"the server is at capacity ({len(self._queues)} requests running or queued); retry later"
            )

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    model: str | None = None) -> "RequestStream":
        """Register a request for the served ``model`` now (raising at once if it cannot be
        served) and return its stream.

        Raises EngineDeadError, EngineDrainingError, EngineOverloadedError, UnknownModelError,
        or ValueError for an invalid request.
        """
        if not self.is_healthy:
            raise EngineDeadError(f"the engine is not running ({self.dead_error or 'stopped'})")
        if self._draining:
            raise EngineDrainingError("the server is shutting down; retry on another replica or later")
        self.check_capacity()
        self.engine.models.get(model)
        self.engine.validate_prompt(prompt_token_ids, params)
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        self._inbox.put(_Add(request_id, list(prompt_token_ids), params, model))
        return RequestStream(self, request_id, q)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """``fn(engine)`` on the engine thread between two steps; its result or exception."""
        if not self.is_healthy:
            raise EngineDeadError(f"the engine is not running ({self.dead_error or 'stopped'})")
        future: Future = Future()
        self._inbox.put(_Call(fn, future))
        return await asyncio.wrap_future(future)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, model: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early aborts the request."""
        stream = self.add_request(request_id, prompt_token_ids, params, model)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def _release(self, request_id: str, finished: bool) -> None:
        self._queues.pop(request_id, None)
        if not finished:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    # ---- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                outputs = self._drain_inbox(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    outputs.extend(self.engine.step())
                self._stats = self.engine.stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as exc:  # the loop itself broke: every waiter must hear about it
            logger.exception("engine thread died")
            self.dead_error = exc
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _drain_inbox(self, block: bool) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while True:
            try:
                msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return outputs
            block = False
            if msg is None:
                return outputs
            if isinstance(msg, _Call):
                if msg.future.set_running_or_notify_cancel():
                    try:
                        msg.future.set_result(msg.fn(self.engine))
                    except Exception as exc:
                        msg.future.set_exception(exc)
                continue
            if isinstance(msg, _Add):
                try:
                    self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.model)
                except Exception as exc:
                    outputs.append(RequestOutput(msg.request_id, finished=True, finish_reason=FinishReason.ERROR, error=str(exc)))
            else:
                aborted = self.engine.abort_request(msg.request_id)
                if aborted is not None:
                    outputs.append(aborted)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _fail_all(self, exc: BaseException) -> None:
        err = EngineDeadError(f"the engine stopped: {type(exc).__name__}: {exc}")
        for q in self._queues.values():
            q.put_nowait(err)


class RequestStream:
    """Async iterator over one request's outputs; ``close()`` before the end aborts it."""

    def __init__(self, engine: AsyncEngine, request_id: str, q: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = q
        self.finished = False
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self.finished = True
            self.close()
        return item

    def close(self) -> None:
        """Stop listening; aborts the request in the engine unless it already finished."""
        if not self._closed:
            self._closed = True
            self.engine._release(self.request_id, self.finished)
