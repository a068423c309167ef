"""``/metrics`` after real traffic: every documented metric is present with consistent values,
and the router load ``pesc:expert_tokens_total{model,layer,expert}`` adds up to tokens x top-k."""

from __future__ import annotations

import httpx
import pytest

from pesc_serve.config import EngineConfig
from tests.server_harness import running_server, scrape, sse_events, wait_until

PROMPTS = [[5, 9, 33, 41, 8], [70, 11, 8], [19, 3, 77, 5, 5, 6, 40]]
MAX_TOKENS = 6
DOCUMENTED = (
    "pesc:num_requests_running",
    "pesc:num_requests_waiting",
    "pesc:kv_cache_usage_perc",
    "pesc:prompt_tokens_total",
    "pesc:generation_tokens_total",
    "pesc:time_to_first_token_seconds_count",
    "pesc:time_per_output_token_seconds_count",
    "pesc:e2e_request_latency_seconds_count",
    "pesc:expert_tokens_total",
    "pesc:request_success_total",
    "pesc:num_preemptions",
    "pesc:prefix_cache_queries",
    "pesc:prefix_cache_hits",
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory):
    # No prefix cache: every prompt token is computed, so the routed-token count is exact.
    engine = EngineConfig(max_num_seqs=8, max_model_len=256, kv_cache_memory_gb=0.05, enable_prefix_caching=False)
    with running_server(str(tiny_checkpoint_factory("camelidae")), engine=engine) as s:
        yield s


def _value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


def test_metrics_after_traffic(server):
    body = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
    before = scrape(server.url)
    assert sum(v for (name, _), v in before.items() if name == "pesc:expert_tokens_total") == 0
    for prompt in PROMPTS[:-1]:
        r = httpx.post(server.v1 + "/completions", json=dict(body, prompt=prompt), timeout=30)
        assert r.status_code == 200
    body_stream = dict(body, prompt=PROMPTS[-1], stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", server.v1 + "/completions", json=body_stream, timeout=30) as resp:
        events = sse_events(resp)
    assert events[-2]["usage"]["completion_tokens"] == MAX_TOKENS
    assert wait_until(lambda: scrape(server.url)[("pesc:num_requests_running", ())] == 0)

    m = scrape(server.url)
    names = {name for name, _ in m}
    assert set(DOCUMENTED) <= names, set(DOCUMENTED) - names
    n = len(PROMPTS)
    model = server.server.model_name
    assert _value(m, "pesc:prompt_tokens_total", model=model) == sum(len(p) for p in PROMPTS)
    assert _value(m, "pesc:generation_tokens_total", model=model) == n * MAX_TOKENS
    assert _value(m, "pesc:time_to_first_token_seconds_count") == n
    assert _value(m, "pesc:time_per_output_token_seconds_count") == n
    assert _value(m, "pesc:e2e_request_latency_seconds_count") == n
    assert _value(m, "pesc:e2e_request_latency_seconds_sum") > 0
    assert _value(m, "pesc:request_success_total", model=model, finished_reason="length") == n
    assert _value(m, "pesc:num_requests_running") == 0
    assert _value(m, "pesc:num_requests_waiting") == 0
    assert _value(m, "pesc:kv_cache_usage_perc") == 0

    cfg, delta = server.server.loaded.config, server.server.loaded.delta
    experts = {labels: v for (name, labels), v in m.items() if name == "pesc:expert_tokens_total"}
    assert {dict(k)["model"] for k in experts} == {model}
    assert {dict(k)["layer"] for k in experts} == {str(i) for i in range(cfg.num_layers)}
    assert {dict(k)["expert"] for k in experts} == {str(e) for e in range(delta.num_experts)}
    # Each request runs its prompt once and feeds back every generated token but the last.
    routed_tokens = sum(len(p) + MAX_TOKENS - 1 for p in PROMPTS)
    for layer in range(cfg.num_layers):
        per_layer = sum(v for k, v in experts.items() if dict(k)["layer"] == str(layer))
        assert per_layer == routed_tokens * delta.topk


def test_metrics_endpoint_format(server):
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE pesc:expert_tokens" in r.text and "# HELP pesc:expert_tokens" in r.text
    assert "# TYPE pesc:time_to_first_token_seconds histogram" in r.text
