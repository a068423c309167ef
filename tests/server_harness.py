"""Run a real pesc-serve (uvicorn + engine thread) on a loopback port inside a test."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import uvicorn

from pesc_serve.config import EngineConfig, LoadConfig, ServerConfig
from pesc_serve.launcher import Server, build_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    server: Server

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@contextmanager
def running_server(
    model: str,
    dtype: str = "float32",
    engine: EngineConfig | None = None,
    server: ServerConfig | None = None,
    load: LoadConfig | None = None,
) -> Iterator[RunningServer]:
    port = free_port()
    built = build_server(
        load or LoadConfig(model=model, dtype=dtype, device="cpu"),
        engine or EngineConfig(max_num_seqs=8, max_model_len=256, kv_cache_memory_gb=0.05),
        server or ServerConfig(port=port),
    )
    uv = uvicorn.Server(uvicorn.Config(built.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", built)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
