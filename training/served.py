"""Evaluate a model through the serving path: a real ``python -m pesc_serve`` over HTTP.

Why a subprocess and HTTP rather than the engine in-process: what is scored must be what users
get (the CLI's flags, quantization, kernels, KV-cache type, batching, detokenization), and
training/ stays independent of the server's internals.  Greedy completions of the eval's
token-id prompts go out concurrently, as a client would send them; the router load per domain
comes from the server's ``pesc:expert_tokens`` counters, read before and after each domain.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

# What each serving profile adds to ``python -m pesc_serve --model M``.
SERVING_FLAGS = {
    "defaults": [],  # exactly what users run
    "exact": ["--dtype", "float32", "--quantization", "none", "--cpu-kernels", "off", "--kv-cache-dtype", "model"],
}
SIZES = ["--kv-cache-memory", "0.5", "--max-num-seqs", "16"]  # memory only, not numerics
STARTUP_TIMEOUT_S = 900.0  # a first start compiles the CPU kernels (about a minute on 2 cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedModel:
    """A pesc-serve process for one model and profile; a context manager that stops it."""

    def __init__(self, model: str, profile: str = "defaults", concurrency: int = 16) -> None:
        if profile not in SERVING_FLAGS:
            raise ValueError(f"unknown serving profile {profile!r}; choose from {', '.join(SERVING_FLAGS)}")
        self.model, self.profile, self.concurrency = model, profile, concurrency
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "pesc_serve", "--model", model, "--port", str(self.port), "--log-level", "warning",
               *SIZES, *SERVING_FLAGS[profile]]
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ))
        self._client = httpx.Client(timeout=600)
        try:
            self._wait_healthy()
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"pesc-serve for {self.model} exited with {self._proc.returncode}:\n{self._log.read()[-4000:]}")
            try:
                if self._client.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"pesc-serve for {self.model} was not healthy after {STARTUP_TIMEOUT_S:.0f} s")

    @property
    def max_model_len(self) -> int:
        return int(self._client.get(self.url + "/v1/models").json()["data"][0]["max_model_len"])

    def complete(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        """Greedy completions (text) of token-id prompts, sent concurrently, in input order;
        a prompt near the context's end asks only for the room left, as the offline loop had."""
        context = self.max_model_len

        def one(ids: list[int]) -> str:
            room = context - len(ids)
            if room < 1:
                return ""
            body = {"prompt": ids, "max_tokens": min(max_tokens, room), "temperature": 0}
            r = self._client.post(self.url + "/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"pesc-serve answered {r.status_code}: {r.text[:500]}")
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, prompts))

    def chat(self, requests: list[dict], max_tokens: int) -> list[dict]:
        """Greedy chat completions of OpenAI request bodies (e.g. with ``tools``), sent
        concurrently, in input order: each reply's ``message``."""

        context = self.max_model_len

        def one(body: dict) -> dict:
            # As complete() does: ask only for the room the rendered prompt leaves (none: no reply).
            counted = self._client.post(self.url + "/tokenize", json={"messages": body["messages"],
                                                                      "tools": body.get("tools")})
            if counted.status_code != 200:
                raise RuntimeError(f"pesc-serve answered {counted.status_code}: {counted.text[:500]}")
            room = context - counted.json()["count"]
            if room < 1:
                return {"role": "assistant", "content": "", "tool_calls": []}
            r = self._client.post(self.url + "/v1/chat/completions",
                                  json={**body, "max_tokens": min(max_tokens, room), "temperature": 0})
            if r.status_code != 200:
                raise RuntimeError(f"pesc-serve answered {r.status_code}: {r.text[:500]}")
            return r.json()["choices"][0]["message"]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, requests))

    def expert_counts(self) -> torch.Tensor | None:
        """The cumulative [layers, experts] router counts, or None for a dense model."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self._client.get(self.url + "/metrics").text
        served_name = self._client.get(self.url + "/v1/models").json()["data"][0]["id"]
        cells = {}
        for fam in text_string_to_metric_families(text):
            if fam.name in ("pesc:expert_tokens", "pesc:expert_tokens_total"):
                for s in fam.samples:
                    if s.labels.get("model") != served_name:
                        continue
                    if s.name.endswith("_total") or s.name == "pesc:expert_tokens":
                        cells[(int(s.labels["layer"]), int(s.labels["expert"]))] = s.value
        if not cells:
            return None
        layers, experts = max(k[0] for k in cells) + 1, max(k[1] for k in cells) + 1
        counts = torch.zeros(layers, experts, dtype=torch.long)
        for (layer, expert), value in cells.items():
            counts[layer, expert] = int(value)
        return counts

    def close(self) -> None:
        self._client.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._log.close()

    def __enter__(self) -> "ServedModel":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class ServedRouting:
    """Per-domain router counts from the server's counters: RoutingRecorder's interface."""

    def __init__(self, served: ServedModel, topk: int) -> None:
        self.served, self.topk = served, topk
        first = served.expert_counts()
        assert first is not None
        self.num_layers, self.num_experts = first.shape
        self.counts: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def measure(self, domain: str, run) -> object:
        """Run ``run()`` and add the router counts it caused to ``domain``."""
        before = self.served.expert_counts()
        result = run()
        added = self.served.expert_counts() - before
        self.counts[domain] = self.counts.get(domain, torch.zeros_like(added)) + added
        self.tokens[domain] = self.tokens.get(domain, 0) + int(added[0].sum()) // max(self.topk, 1)
        return result

    def share(self, domain: str | None = None) -> torch.Tensor:
        counts = sum(self.counts.values()) if domain is None else self.counts[domain]
        counts = counts.float()
        return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def describe_profile(profile: str) -> str:
    flags = " ".join(SERVING_FLAGS[profile])
    return f"python -m pesc_serve --model M {flags}".rstrip()

