"""The HTTP ingress: one OpenAI endpoint in front of the engine replicas.

Serve's HTTP proxy hands every request to this small deployment (no CPU of its own).  It
reads the body once, and forwards the request to an engine replica through a handle whose
multiplexed model id is the body's ``model`` when that names a delta: Serve's router then
prefers a replica that holds the delta, and otherwise picks by power of two choices (or by
prompt prefix with ``--router prefix``).  The replica's response streams back unchanged.

Faults: when the replica dies under a request, the client gets an OpenAI error object (HTTP
503 before the first byte; inside a stream an ``{"error": ...}`` event, then ``[DONE]``).
``/health`` and ``/metrics`` are answered here from every replica at once (a broadcast).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pesc_serve.ray.forwarding import HTTPCall, read_call
from pesc_serve.ray.metrics import merge_metrics
from pesc_serve.server.errors import error_body, error_response

logger = logging.getLogger("pesc_serve.ray")

BROADCAST_TIMEOUT_S = 10.0  # /health and /metrics: a replica slower than this counts as not ready
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)  # the replica went away


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs from the server flags."""

    deltas: frozenset[str]  # models whose requests go to a replica holding them
    max_body_bytes: int  # the app's limit, checked here before the body crosses to a replica


def replica_lost(exc: BaseException) -> tuple[int, dict]:
    """(status, OpenAI error body) for a request whose replica failed under it."""
    if isinstance(exc, BackPressureError):
        return 429, error_body(429, "every replica is at capacity and the queue is full; retry later",
                               code="server_overloaded")
    if isinstance(exc, _LOST):
        return 503, error_body(503, f"the engine replica serving this request stopped ({type(exc).__name__}); "
                                    "retry the request", code="replica_unavailable")
    return 500, error_body(500, f"internal error: {type(exc).__name__}", code="internal_error")


class ForwardedResponse(Response):
    """Sends a replica's response messages as they arrive.  A stream whose replica fails after
    the headers ends with an error event and ``[DONE]``; leaving early cancels the replica's
    work (the client disconnected)."""

    def __init__(self, start: Message, first: Message, rest: DeploymentResponseGenerator) -> None:
        self.status_code = start["status"]
        self.background = None
        # Serve's proxy sets X-Request-ID on the request (when the client sent none) and on the
        # response; the app echoes the same id, which would repeat the header.
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"x-request-id"]
        self.start, self.first, self.rest = dict(start, headers=headers), first, rest
        content_type = dict(headers).get(b"content-type", b"")
        self.is_sse = content_type.startswith(b"text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = not self.first.get("more_body", False)
        try:
            await send(self.start)
            await send(self.first)
            while not finished:
                try:
                    message = await self.rest.__anext__()
                except StopAsyncIteration:
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
                except Exception as exc:
                    logger.warning("replica failed during a response: %s", exc)
                    message = {"type": "http.response.body", "body": self._error_tail(exc), "more_body": False}
                finished = not message.get("more_body", False)
                await send(message)
        finally:
            if not finished:
                self.rest.cancel()

    def _error_tail(self, exc: BaseException) -> bytes:
        if not self.is_sse:
            return b""  # the body is cut; the client sees a truncated response
        _, body = replica_lost(exc)
        return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


@serve.ingress()
class OpenAIIngress:
    """Routes OpenAI requests to the engine replicas; answers ``/health`` and ``/metrics``."""

    def __init__(self, engine: DeploymentHandle, settings: IngressSettings) -> None:
        self.engine = engine
        self.settings = settings

    async def __serve_build_asgi_app__(self) -> ASGIApp:
        app = FastAPI(title="pesc-serve on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/health")
        async def health() -> Response:
            replicas = await self._broadcast("info")
            ready = sum(1 for r in replicas if r["healthy"])
            if ready == 0:
                return error_response(503, "no engine replica is ready", code="no_ready_replica")
            return JSONResponse({"status": "ok", "replicas_ready": ready, "replicas": replicas})

        @app.get("/metrics")
        async def metrics() -> Response:
            reports = await self._broadcast("metrics_report")
            return Response(merge_metrics(reports), media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.api_route("/{path:path}", methods=_METHODS)
        async def forward(request: Request) -> Response:
            body = await self._read_body(request)
            if isinstance(body, Response):
                return body
            return await self._forward(request.scope, body)

        return app

    async def _broadcast(self, method: str) -> list[dict[str, Any]]:
        """Every running replica's answer; replicas that failed or timed out are left out."""
        try:
            answers = await self.engine.broadcast(method).results_async(
                timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True)
        except TimeoutError:
            return []
        return [a for a in answers if isinstance(a, dict)]

    async def _read_body(self, request: Request) -> bytes | Response:
        limit = self.settings.max_body_bytes
        too_large = error_response(413, f"request body exceeds the limit of {limit} bytes", code="payload_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return too_large
        return bytes(body)

    async def _forward(self, scope: Scope, body: bytes) -> Response:
        """Send the request to a replica; its response, or an OpenAI error when none answers."""
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        client = tuple(scope["client"]) if scope.get("client") else None
        call: HTTPCall = read_call(scope["method"], path, scope.get("query_string", b""),
                                   list(scope.get("headers", [])), body, client)
        delta = call.model if call.model in self.settings.deltas else ""
        stream = self.engine.options(stream=True, multiplexed_model_id=delta).handle.remote(call)
        try:
            start = await stream.__anext__()
            # The headers leave with the first body: a replica lost before that is a clean 503.
            first = await stream.__anext__()
        except StopAsyncIteration:
            return error_response(500, "the replica returned no response", code="internal_error")
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:
            status, err = replica_lost(exc)
            if status == 500:
                logger.exception("forwarding failed")
            else:
                logger.warning("request failed on its replica: %s", exc)
            stream.cancel()
            headers = {"Retry-After": "1"} if status in (429, 503) else None
            return JSONResponse(err, status_code=status, headers=headers)
        return ForwardedResponse(start, first, stream)
