"""uvicorn, with a shutdown that drains the engine and answers every running request.

uvicorn on its own stops accepting on SIGTERM, waits for open connections, then cancels
them: a request still generating would lose its answer (a stream cut without a final
chunk, a plain request with no response at all).  Here the engine's drain starts as soon as
uvicorn begins shutting down, so once ``--shutdown-timeout`` is over the engine aborts what
is left *with an answer* (finish_reason ``abort``), and uvicorn's own wait outlasts that.
"""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from pesc_serve.config import ServerConfig
from pesc_serve.engine.async_engine import ANSWER_GRACE_S, AsyncEngine


def uvicorn_graceful_timeout(cfg: ServerConfig) -> float:
    """uvicorn's wait for connections: the drain, the streams' grace after it, and a margin."""
    return cfg.shutdown_timeout_s + 2 * ANSWER_GRACE_S


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose shutdown first starts the engine's drain."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.begin_drain(self.drain_timeout_s)
        await super().shutdown(sockets=sockets)


def http_server(app: FastAPI, engine: AsyncEngine, cfg: ServerConfig, log_level: str = "info") -> DrainingServer:
    """The server ``python -m pesc_serve`` runs (``.run()`` blocks until it has drained)."""
    config = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=uvicorn_graceful_timeout(cfg)
    )
    return DrainingServer(config, engine, cfg.shutdown_timeout_s)
