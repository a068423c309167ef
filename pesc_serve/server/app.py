"""FastAPI app factory: routes, auth, body-size limit, health, metrics, error handlers."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pesc_serve.config import ServerConfig
from pesc_serve.engine.async_engine import AsyncEngine
from pesc_serve.server.chat import ChatFormatter
from pesc_serve.server.errors import error_body, error_response, install_error_handlers
from pesc_serve.server.metrics import ServerMetrics
from pesc_serve.server.openai_routes import OpenAIServing, build_router

OPEN_PATHS = ("/health", "/metrics", "/ping", "/docs", "/openapi.json")


class BodySizeLimit:
    """Answer 413 for bodies over the limit, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = error_response(413, f"request body exceeds the limit of {self.max_bytes} bytes", code="payload_too_large")
        await resp(scope, receive, send)


class _TooLarge(Exception):
    pass


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
            await engine.shutdown()

    app = FastAPI(title="pesc-serve", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    serving = OpenAIServing(engine, formatter, model_name, cfg, metrics)
    app.state.serving = serving

    if cfg.api_key:
        expected = f"Bearer {cfg.api_key}".encode()

        @app.middleware("http")
        async def require_api_key(request: Request, call_next):
            if request.url.path.startswith("/v1"):
                given = request.headers.get("authorization", "").encode()
                if not secrets.compare_digest(given, expected):
                    return JSONResponse(
                        error_body(401, "invalid or missing API key", code="invalid_api_key"),
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
            return await call_next(request)

    app.include_router(build_router(serving))

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy:
            return error_response(503, f"engine is not running: {engine.dead_error or 'stopped'}", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        if metrics is None:
            return error_response(404, "metrics are disabled")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes)
    return app
