"""A bounded soak: 300 small requests (chat and completions, streaming and not), 24 at a
time, a fifth of them hanging up mid-stream.  No request is lost, every finished one is
complete, and afterwards nothing is running, waiting or holding KV blocks."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from pesc_serve.config import EngineConfig
from tests.server_harness import engine_idle, running_server, scrape, wait_until

NUM_REQUESTS = 300
CONCURRENCY = 24
HANG_GUARD_S = 600  # only catches a hang: a slow or busy host takes longer instead of failing


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory, profile):
    engine = EngineConfig(max_num_seqs=32, max_queue_len=512, max_model_len=128, kv_cache_memory_gb=0.05)
    with running_server(str(tiny_checkpoint_factory("camelidae")), engine=engine, profile=profile) as s:
        yield s


def _body(i: int, rng: random.Random) -> tuple[str, dict]:
    max_tokens = rng.randint(4, 8)
    common = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": rng.choice([0, 0.8]), "seed": i}
    if i % 2:
        return "/chat/completions", dict(common, messages=[{"role": "user", "content": f"request {i}"}])
    return "/completions", dict(common, prompt=f"request {i} says")


async def _one(client: httpx.AsyncClient, url: str, i: int, rng: random.Random) -> str:
    """Run request ``i``; returns "hung-up" or "done" (asserting the response is complete)."""
    path, body = _body(i, rng)
    kind = i % 5  # 0: hang up mid-stream; 1, 2: full stream; 3, 4: one JSON body
    if kind >= 3:
        r = await client.post(url + path, json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == body["max_tokens"]
        return "done"
    async with client.stream("POST", url + path, json=dict(body, stream=True)) as resp:
        assert resp.status_code == 200
        data_lines = 0
        finishes = []
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data_lines += 1
            if kind == 0 and data_lines == 2:
                return "hung-up"  # leaving the block closes the connection
            if line == "data: [DONE]":
                break
            if '"finish_reason":"' in line:
                finishes.append(line)
        assert line == "data: [DONE]" and len(finishes) == 1, (i, finishes)
    return "done"


def test_soak(server):
    rng = random.Random(0)

    async def soak() -> list[str]:
        limits = httpx.Limits(max_connections=CONCURRENCY * 2)
        async with httpx.AsyncClient(timeout=HANG_GUARD_S, limits=limits) as client:
            gate = asyncio.Semaphore(CONCURRENCY)

            async def gated(i: int) -> str:
                async with gate:
                    return await _one(client, server.v1, i, rng)

            return await asyncio.gather(*(gated(i) for i in range(NUM_REQUESTS)))

    outcomes = asyncio.run(asyncio.wait_for(soak(), HANG_GUARD_S))
    assert outcomes.count("hung-up") == NUM_REQUESTS // 5
    assert outcomes.count("done") == NUM_REQUESTS - NUM_REQUESTS // 5
    assert wait_until(lambda: engine_idle(server)), server.server.engine.stats()
    metrics = scrape(server.url)
    assert metrics[("pesc:num_requests_running", ())] == 0
    assert metrics[("pesc:num_requests_waiting", ())] == 0
    assert metrics[("pesc:kv_cache_usage_perc", ())] == 0
    by_reason = {dict(labels)["finished_reason"]: v for (name, labels), v in metrics.items() if name == "pesc:request_success_total"}
    assert sum(by_reason.values()) == NUM_REQUESTS, by_reason  # each request accounted for exactly once
    assert by_reason.get("abort", 0) <= NUM_REQUESTS // 5
