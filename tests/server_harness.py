"""Run a real pesc-serve (uvicorn + engine thread) on a loopback port inside a test."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pesc_serve.config import EngineConfig, LoadConfig, ServerConfig
from pesc_serve.launcher import Server, build_server
from pesc_serve.server.http_server import http_server
from tests.profiles import load_config, with_profile

DEFAULT_TEST_ENGINE = EngineConfig(max_num_seqs=8, max_model_len=256, kv_cache_memory_gb=0.05)


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
    profile: str | None = None,
    chat_template: Path | None = None,
) -> Iterator[RunningServer]:
    """A server on a free port; ``profile`` (tests/profiles.py) sets the weights, kernels and
    KV-cache type, over the sizes of ``engine``."""
    if profile is not None:
        load = load or load_config(profile, model)
        engine = with_profile(profile, engine or DEFAULT_TEST_ENGINE)
    port = free_port()
    built_cfg = server or ServerConfig(port=port)
    built = build_server(
        load or LoadConfig(model=model, dtype=dtype, device="cpu"),
        engine or DEFAULT_TEST_ENGINE,
        built_cfg,
        chat_template,
    )
    uv = http_server(built.app, built.engine, dataclasses.replace(built_cfg, port=port), log_level="warning")
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


def sse_events(resp_or_lines) -> list:
    """The ``data:`` payloads of an SSE response (JSON objects, and the final "[DONE]").

    Pass the response, or the line iterator already being read: a second ``iter_lines()``
    is refused, and dropping a half-read iterator closes the connection.
    """
    import json

    lines = resp_or_lines.iter_lines() if hasattr(resp_or_lines, "iter_lines") else resp_or_lines
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def wait_until(predicate, timeout_s: float = 120.0, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or the time is up; returns its last value.  The
    limit only catches hangs: it returns as soon as the predicate holds, so a busy or slow host
    waits longer instead of failing."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


def engine_idle(server: RunningServer) -> bool:
    """No request in flight, running or waiting, and no KV block in use."""
    engine = server.server.engine
    stats = engine.stats()
    return engine.num_in_flight == 0 and stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0
