"""Limits: past ``--max-num-seqs`` running + ``--max-queue-len`` waiting the server answers 429
with Retry-After at once (no hang); ``--request-timeout`` aborts a request (504, or an error
event in a stream) and frees its KV blocks."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from pesc_serve.config import EngineConfig, ServerConfig
from tests.server_harness import engine_idle, running_server, scrape, sse_events, wait_until

MAX_NUM_SEQS, MAX_QUEUE_LEN = 2, 2
LONG = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 200, "ignore_eos": True, "stream": True}


def slow_engine(server, delay_s: float = 0.02) -> None:
    """Make every engine step take at least ``delay_s``: long requests stay long on any CPU."""
    engine = server.server.engine.engine
    real = engine.step

    def step():
        time.sleep(delay_s)
        return real()

    engine.step = step


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory):
    engine = EngineConfig(max_num_seqs=MAX_NUM_SEQS, max_queue_len=MAX_QUEUE_LEN, max_model_len=256, kv_cache_memory_gb=0.05)
    with running_server(str(tiny_checkpoint_factory("camelidae")), engine=engine) as s:
        slow_engine(s)
        yield s


async def _open_stream(client: httpx.AsyncClient, url: str):
    """Start a streaming request and read its first event (it is registered by then).

    Returns the response and its line iterator: dropping the iterator closes the
    connection, which the server (rightly) treats as a disconnect.
    """
    resp = await client.send(client.build_request("POST", url, json=LONG), stream=True)
    assert resp.status_code == 200
    lines = resp.aiter_lines()
    async for line in lines:
        if line.startswith("data: "):
            break
    return resp, lines


def test_burst_past_the_queue_limit_gets_429_at_once(server):
    url = server.v1 + "/chat/completions"
    capacity = MAX_NUM_SEQS + MAX_QUEUE_LEN

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            held = [await _open_stream(client, url) for _ in range(capacity)]
            assert wait_until(lambda: server.server.engine.stats().num_waiting == MAX_QUEUE_LEN)
            metrics = scrape(server.url)
            assert metrics[("pesc:num_requests_running", ())] == MAX_NUM_SEQS
            assert metrics[("pesc:num_requests_waiting", ())] == MAX_QUEUE_LEN

            bodies = [dict(LONG, stream=i % 2 == 0) for i in range(12)]
            results = await asyncio.gather(*(client.post(url, json=b) for b in bodies))
            for r in results:
                assert r.status_code == 429, r.text
                assert r.headers["retry-after"].isdigit()
                assert r.json()["error"]["type"] == "rate_limit_error"
            # at once: refused while the queue it found full is still full, not after it drained
            assert server.server.engine.stats().num_waiting == MAX_QUEUE_LEN
            # completions count against the same limit; n counts n times
            r = await client.post(server.v1 + "/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 429
            for resp, _ in held:
                await resp.aclose()
            assert wait_until(lambda: engine_idle(server))
            r = await client.post(url, json=dict(LONG, max_tokens=2, stream=False))
            assert r.status_code == 200
            r = await client.post(url, json=dict(LONG, max_tokens=2, stream=False, n=capacity + 1))
            assert r.status_code == 429

    asyncio.run(asyncio.wait_for(burst(), 60))


@pytest.fixture(scope="module")
def timeout_server(tiny_checkpoint_factory):
    with running_server(str(tiny_checkpoint_factory("camelidae")), server=ServerConfig(request_timeout_s=0.5)) as s:
        slow_engine(s)
        yield s


def test_request_timeout_non_streaming_is_504_and_frees_kv(timeout_server):
    r = httpx.post(timeout_server.v1 + "/chat/completions", json=dict(LONG, stream=False), timeout=30)
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "timeout_error"
    assert wait_until(lambda: engine_idle(timeout_server))


def test_request_timeout_streaming_ends_with_an_error_event(timeout_server):
    with httpx.stream("POST", timeout_server.v1 + "/chat/completions", json=LONG, timeout=30) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "timeout"
    assert wait_until(lambda: engine_idle(timeout_server))
    # short requests are unaffected
    r = httpx.post(timeout_server.v1 + "/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200
