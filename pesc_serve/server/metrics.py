"""Prometheus metrics (prometheus_client, one registry per app: no global state).

Engine gauges are read at scrape time; request latencies are measured on the server side
of the engine client with ``time.monotonic``; the router load per (layer, expert) comes
from counters the PESC MLP accumulates on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from pesc_serve.engine.engine import EngineStats
from pesc_serve.engine.request import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _ExpertCollector:
    """Exposes each served model's cumulative [L, E] routing counts as one labelled counter."""

    def __init__(self, counts: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(
            "pesc:expert_tokens", "Tokens routed to each expert (router load)", labels=["model", "layer", "expert"]
        )
        for model, counts in self.counts().items():
            for layer, row in enumerate(counts.tolist()):
                for expert, value in enumerate(row):
                    fam.add_metric([model, str(layer), str(expert)], value)
        yield fam


# (metric, EngineStats field, help): read from the engine's last step at scrape time.
_ENGINE_GAUGES = (
    ("pesc:num_requests_running", "num_running", "Requests in the running batch"),
    ("pesc:num_requests_waiting", "num_waiting", "Requests waiting to be scheduled"),
    ("pesc:kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV-cache blocks in use (0-1)"),
    ("pesc:num_preemptions", "num_preemptions", "Preemptions so far (recomputed requests)"),
    ("pesc:prefix_cache_queries", "prefix_cache_queries", "Prefix-cache lookups so far"),
    ("pesc:prefix_cache_hits", "prefix_cache_hits", "Prefix-cache lookups that found cached blocks"),
)


@dataclass
class _Timing:
    start: float
    model: str
    first_token: float | None = None
    num_tokens: int = 0


@dataclass
class ServerMetrics:
    """Metric objects plus the per-request timings they need."""

    stats: Callable[[], EngineStats]
    expert_counts: Callable[[], dict[str, torch.Tensor]] | None = None  # ExpertLoad.snapshot: model -> [L, E]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _timings: dict[str, _Timing] = field(default_factory=dict)

    def __post_init__(self) -> None:
        r = self.registry
        for name, field_name, doc in _ENGINE_GAUGES:
            gauge = Gauge(name, doc, registry=r)
            gauge.set_function(lambda f=field_name: getattr(self.stats(), f))
        self.prompt_tokens = Counter("pesc:prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("pesc:generation_tokens", "Tokens generated", ["model"], registry=r)
        self.request_success = Counter(
            "pesc:request_success", "Finished requests by model and finish reason", ["model", "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "pesc:time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "pesc:time_per_output_token_seconds", "Mean time per output token after the first",
            buckets=_TPOT_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "pesc:e2e_request_latency_seconds", "End-to-end request latency", buckets=_E2E_BUCKETS, registry=r
        )
        if self.expert_counts is not None:
            r.register(_ExpertCollector(self.expert_counts))

    def on_start(self, request_id: str, model: str = "") -> None:
        self._timings[request_id] = _Timing(time.monotonic(), model)

    def on_output(self, request_id: str, out: RequestOutput) -> None:
        t = self._timings.get(request_id)
        if t is None:
            return
        now = time.monotonic()
        if out.new_token_ids and t.first_token is None:
            t.first_token = now
            self.ttft.observe(now - t.start)
            self.prompt_tokens.labels(model=t.model).inc(out.num_prompt_tokens)
        t.num_tokens += len(out.new_token_ids)
        self.generation_tokens.labels(model=t.model).inc(len(out.new_token_ids))
        if out.finished:
            self.e2e.observe(now - t.start)
            if t.first_token is not None and t.num_tokens > 1:
                self.tpot.observe((now - t.first_token) / (t.num_tokens - 1))
            reason = out.finish_reason.value if out.finish_reason is not None else "unknown"
            self.request_success.labels(model=t.model, finished_reason=reason).inc()
            self._timings.pop(request_id, None)

    def on_close(self, request_id: str) -> None:
        """The client stopped listening; a request that had not finished counts as aborted."""
        t = self._timings.pop(request_id, None)
        if t is not None:
            self.request_success.labels(model=t.model, finished_reason="abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
