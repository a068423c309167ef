"""FastAPI app factory: routes, auth, body-size limit, health, metrics, error handlers."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pesc_serve.config import ServerConfig
from pesc_serve.engine.async_engine import AsyncEngine
from pesc_serve.server.chat import ChatFormatter
from pesc_serve.server.errors import error_response, install_error_handlers
from pesc_serve.server.metrics import ServerMetrics
from pesc_serve.server.adapter_routes import build_adapter_router
from pesc_serve.server.openai_routes import build_router
from pesc_serve.server.utility_routes import build_utility_router
from pesc_serve.server.serving import OpenAIServing



class EchoRequestId:
    """Copy the client's ``X-Request-Id`` onto the response (the completion handlers also use it
    as the request's id), so a client or proxy can match logs and answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", [])).get(b"x-request-id")
        if given is None:
            return await self.app(scope, receive, send)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + [(b"x-request-id", given)])
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodySizeLimit:
    """Answer 413 for bodies over the limit, whether announced by Content-Length or chunked.

    A chunked body is read here first (up to the limit) and replayed to the app: FastAPI
    turns any error raised while it reads the body into a 400, so the check cannot happen
    inside its read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:  # the HTTP server already checked that it is a number
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._reject(scope, receive, send)
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._reject(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = error_response(413, f"request body exceeds the limit of {self.max_bytes} bytes", code="payload_too_large")
        await resp(scope, receive, send)


class RequireAPIKey:
    """401 unless ``Authorization: Bearer KEY`` on /v1/*; /health and /metrics stay open.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` wraps ``receive`` in a way
    that hides client disconnects from the handlers, which must abort on them.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                resp = error_response(
                    401, "invalid or missing API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(
    engine: AsyncEngine,
    formatter: ChatFormatter,
    model_name: str,
    cfg: ServerConfig,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """Build the app around a (not yet started) AsyncEngine; the lifespan starts and drains it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown(cfg.shutdown_timeout_s)

    app = FastAPI(title="pesc-serve", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    serving = OpenAIServing(engine, formatter, model_name, cfg, metrics)
    app.state.serving = serving

    app.include_router(build_router(serving))
    app.include_router(build_utility_router(serving))
    if cfg.enable_runtime_adapters:
        app.include_router(build_adapter_router(serving))

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy:
            return error_response(503, f"engine is not running: {engine.dead_error or 'stopped'}", code="engine_dead")
        if engine.is_draining:  # a load balancer stops sending requests here
            return error_response(503, "the server is shutting down", code="shutting_down")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        if metrics is None:
            return error_response(404, "metrics are disabled")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if cfg.api_key:
        app.add_middleware(RequireAPIKey, api_key=cfg.api_key)
    app.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(EchoRequestId)
    return app
