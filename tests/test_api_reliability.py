"""Reliability on a live server (CLI defaults and exact float32): a client that disconnects
(streaming or not) aborts its request and frees its KV blocks within one engine step; a failing
engine step or one request's failing detokenizer fails only those requests; a draining server
refuses new requests and answers every running one; a dead engine turns /health and new
requests into 503s instead of hangs."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse

import httpx
import pytest

from pesc_serve.config import EngineConfig, ServerConfig
from pesc_serve.engine.request import FinishReason
from tests.server_harness import engine_idle, running_server, scrape, sse_events, wait_until
from tests.test_api_limits import slow_engine

LONG_CHAT = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 200, "ignore_eos": True}
POISON = [7, 7, 7, 7, 7, 7]  # a prompt whose engine steps fail (see fault_injection)


class StepProbe:
    """Counts engine steps and records, for each abort the engine handles, how many steps
    ran between the HTTP side asking for it and the engine freeing the request."""

    def __init__(self, server) -> None:
        self.async_engine = server.server.engine
        engine = self.async_engine.engine
        self.steps = 0
        self.requested: dict[str, int] = {}
        self.freed: dict[str, tuple[int, float]] = {}
        real_step, real_abort, real_async_abort = engine.step, engine.abort_request, self.async_engine.abort

        def step():
            self.steps += 1
            return real_step()

        def abort_request(request_id: str):
            out = real_abort(request_id)
            if out is not None:
                self.freed[request_id] = (self.steps, engine.kv.usage)
            return out

        def async_abort(request_id: str) -> None:
            self.requested[request_id] = self.steps
            real_async_abort(request_id)

        engine.step, engine.abort_request, self.async_engine.abort = step, abort_request, async_abort

    def check_aborted_within_one_step(self) -> None:
        assert self.freed, "no request was aborted"
        for rid, (step, _) in self.freed.items():
            assert step - self.requested[rid] <= 1, (rid, self.requested[rid], step)


@pytest.fixture(scope="module", params=[None, "sk-key"], ids=["no-auth", "auth-middleware"])
def server(request, tiny_checkpoint_factory, profile):
    cfg = ServerConfig(api_key=request.param)
    with running_server(str(tiny_checkpoint_factory("camelidae")), server=cfg, profile=profile) as s:
        slow_engine(s)
        s.headers = {"Authorization": f"Bearer {request.param}"} if request.param else {}
        yield s


def _finished(metrics: dict, reason: str) -> float:
    """Requests finished with ``reason``, over every served model."""
    return sum(v for (name, labels), v in metrics.items()
               if name == "pesc:request_success_total" and dict(labels)["finished_reason"] == reason)


def _aborts(server) -> float:
    return _finished(scrape(server.url), "abort")


def test_stream_disconnect_aborts_and_frees_kv(server):
    probe = StepProbe(server)
    before = _aborts(server)
    with httpx.Client(timeout=30, headers=server.headers) as client:
        with client.stream("POST", server.v1 + "/chat/completions", json=dict(LONG_CHAT, stream=True)) as resp:
            assert resp.status_code == 200
            seen = 0
            for line in resp.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
            assert server.server.engine.stats().kv_cache_usage > 0
        # leaving the block closes the connection mid-stream
    assert wait_until(lambda: engine_idle(server)), server.server.engine.stats()
    probe.check_aborted_within_one_step()
    assert all(kv == 0 for _, kv in probe.freed.values())
    assert probe.steps < 100  # far from the 200 tokens it asked for
    assert wait_until(lambda: _aborts(server) == before + 1)


def _post_and_hang_up_once(server, path: str, body: dict, running) -> None:
    """POST ``body`` on a raw connection and close it, unread, once ``running()`` holds: the
    hang-up lands while the engine runs the request however slow the host is (a client-side
    read timeout would race the server's tokenizing and scheduling instead)."""
    url = urllib.parse.urlsplit(server.url)
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in server.headers.items())]
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        assert wait_until(running), server.server.engine.stats()


def test_non_streaming_disconnect_aborts_and_frees_kv(server):
    probe = StepProbe(server)
    _post_and_hang_up_once(server, "/v1/chat/completions", dict(LONG_CHAT, n=2),
                           lambda: server.server.engine.stats().num_running == 2)
    assert wait_until(lambda: engine_idle(server)), server.server.engine.stats()
    probe.check_aborted_within_one_step()
    assert len(probe.freed) == 2  # both choices
    assert probe.steps < 150


def test_disconnect_while_waiting_in_the_queue(tiny_checkpoint_factory):
    engine = EngineConfig(max_num_seqs=1, max_model_len=256, kv_cache_memory_gb=0.05)
    with running_server(str(tiny_checkpoint_factory("camelidae")), engine=engine) as server:
        slow_engine(server)
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", server.v1 + "/chat/completions", json=dict(LONG_CHAT, stream=True)) as running:
                running_lines = running.iter_lines()  # kept: dropping it would close the connection
                next(running_lines)
                with client.stream("POST", server.v1 + "/chat/completions", json=dict(LONG_CHAT, stream=True)) as queued:
                    queued_lines = queued.iter_lines()
                    next(queued_lines)
                    assert wait_until(lambda: server.server.engine.stats().num_waiting == 1)
                assert wait_until(lambda: server.server.engine.stats().num_waiting == 0)
                assert server.server.engine.stats().num_running == 1
                assert server.server.engine.num_in_flight == 1
        assert wait_until(lambda: engine_idle(server))


# ---- faults ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_server(tiny_checkpoint_factory, profile):
    """One running request at a time; steps that include the POISON prompt after its second
    generated token raise, as a model bug or a device error would."""
    engine = EngineConfig(max_num_seqs=1, max_model_len=256, kv_cache_memory_gb=0.05)
    with running_server(str(tiny_checkpoint_factory("camelidae")), engine=engine, profile=profile) as s:
        runner = s.server.engine.engine.runner
        real = runner.execute

        def execute(out):
            if any(c.request.prompt_token_ids == POISON and len(c.request.output_token_ids) >= 2 for c in out.chunks):
                raise RuntimeError("injected device fault")
            return real(out)

        runner.execute = execute
        slow_engine(s, 0.005)
        yield s


def test_failing_step_fails_only_its_requests_streaming(faulty_server):
    url = faulty_server.v1 + "/completions"
    poison = {"prompt": POISON, "max_tokens": 50, "ignore_eos": True, "stream": True}
    results: dict[str, object] = {}

    def bystander() -> None:  # queued behind the poisoned request: not in its steps
        results["bystander"] = httpx.post(url, json={"prompt": [5, 9, 33], "max_tokens": 5, "ignore_eos": True}, timeout=30)

    with httpx.stream("POST", url, json=poison, timeout=30) as resp:
        thread = threading.Thread(target=bystander)
        thread.start()
        assert resp.status_code == 200
        events = sse_events(resp)
    thread.join(30)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_error"
    assert "injected device fault" in events[-2]["error"]["message"]
    assert any(e.get("choices") and e["choices"][0]["text"] for e in events[:-2])  # it had streamed tokens
    bystander_resp = results["bystander"]
    assert bystander_resp.status_code == 200, bystander_resp.text
    assert bystander_resp.json()["usage"]["completion_tokens"] == 5
    assert httpx.get(faulty_server.url + "/health").json() == {"status": "ok"}
    assert wait_until(lambda: engine_idle(faulty_server))
    metrics = scrape(faulty_server.url)
    assert _finished(metrics, FinishReason.ERROR.value) >= 1


def test_failing_step_non_streaming_is_500_and_server_keeps_serving(faulty_server):
    r = httpx.post(faulty_server.v1 + "/completions", json={"prompt": POISON, "max_tokens": 50, "ignore_eos": True}, timeout=30)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error"
    r = httpx.post(faulty_server.v1 + "/completions", json={"prompt": [5, 9], "max_tokens": 3}, timeout=30)
    assert r.status_code == 200
    assert wait_until(lambda: engine_idle(faulty_server))


# ---- a dead engine --------------------------------------------------------------------------


def test_dead_engine_gives_503_not_hangs(tiny_checkpoint_factory):
    with running_server(str(tiny_checkpoint_factory("camelidae"))) as server:
        engine = server.server.engine.engine
        real_step = engine.step
        kill = threading.Event()

        def step():
            if kill.is_set():
                raise RuntimeError("scheduler bug escaped the step")
            time.sleep(0.01)
            return real_step()

        engine.step = step
        with httpx.stream("POST", server.v1 + "/chat/completions", json=dict(LONG_CHAT, stream=True), timeout=30) as resp:
            lines = resp.iter_lines()
            next(lines)
            kill.set()
            events = sse_events(lines)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "engine_dead"
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 503
        assert "scheduler bug" in health.json()["error"]["message"]
        # the engine can never answer again, so a 503 at all shows nothing waited for it
        for path, body in (("/chat/completions", LONG_CHAT), ("/completions", {"prompt": "x"})):
            r = httpx.post(server.v1 + path, json=body, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert httpx.get(server.url + "/metrics", timeout=5).status_code == 200


# ---- a fault in one request's output processing -------------------------------------------


@pytest.fixture
def detokenizer_fault(monkeypatch):
    """The POISON prompt's detokenizer raises on its third token; every other request's works."""
    import pesc_serve.engine.engine as engine_module

    real = engine_module.IncrementalDetokenizer

    class Faulty(real):
        def __init__(self, tokenizer, prompt_token_ids, *args, **kwargs):
            super().__init__(tokenizer, prompt_token_ids, *args, **kwargs)
            self.poisoned, self.calls = list(prompt_token_ids) == POISON, 0

        def add_token(self, *args, **kwargs):
            self.calls += 1
            if self.poisoned and self.calls == 3:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
            return super().add_token(*args, **kwargs)

    monkeypatch.setattr(engine_module, "IncrementalDetokenizer", Faulty)


def test_a_detokenizer_fault_fails_only_its_request_over_http(tiny_checkpoint_factory, profile, detokenizer_fault):
    with running_server(str(tiny_checkpoint_factory("camelidae")), profile=profile) as server:
        url = server.v1 + "/completions"
        body = {"prompt": POISON, "max_tokens": 30, "ignore_eos": True}
        results: dict[str, object] = {}

        def bystander() -> None:  # in the same steps as the poisoned request
            results["ok"] = httpx.post(url, json={"prompt": [5, 9, 33], "max_tokens": 30, "ignore_eos": True}, timeout=30)

        thread = threading.Thread(target=bystander)
        thread.start()
        with httpx.stream("POST", url, json=dict(body, stream=True), timeout=30) as resp:
            assert resp.status_code == 200
            events = sse_events(resp)
        thread.join(30)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "engine_error"
        assert "injected detokenizer fault" in events[-2]["error"]["message"]
        plain = httpx.post(url, json=body, timeout=30)
        assert plain.status_code == 500 and plain.json()["error"]["code"] == "engine_error"
        assert results["ok"].status_code == 200 and results["ok"].json()["usage"]["completion_tokens"] == 30
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        assert wait_until(lambda: engine_idle(server))


# ---- draining ---------------------------------------------------------------------------------


def test_draining_refuses_new_requests_and_lets_running_ones_finish(tiny_checkpoint_factory):
    with running_server(str(tiny_checkpoint_factory("camelidae"))) as server:
        slow_engine(server, 0.005)
        engine = server.server.engine
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", server.v1 + "/chat/completions", json=dict(LONG_CHAT, stream=True)) as running:
                lines = running.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                engine._loop.call_soon_threadsafe(engine.begin_drain, 60.0)
                assert wait_until(lambda: engine.is_draining)
                refused = client.post(server.v1 + "/chat/completions", json=LONG_CHAT)
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
                assert refused.headers["retry-after"]
                health = client.get(server.url + "/health")
                assert health.status_code == 503 and health.json()["error"]["code"] == "shutting_down"
                events = sse_events(lines)
        assert events[-1] == "[DONE]"
        assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]] == ["length"]


def test_drain_over_aborts_with_an_answer(tiny_checkpoint_factory):
    """What is still running when the drain ends gets a final answer, streamed or not."""
    with running_server(str(tiny_checkpoint_factory("camelidae"))) as server:
        slow_engine(server, 0.01)  # 200 tokens take at least 2 s; the drain lasts 0.2 s
        engine = server.server.engine
        long_chat = LONG_CHAT
        results: dict[str, object] = {}

        def plain() -> None:
            results["plain"] = httpx.post(server.v1 + "/chat/completions", json=long_chat, timeout=30)

        with httpx.stream("POST", server.v1 + "/chat/completions", json=dict(long_chat, stream=True), timeout=30) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            thread = threading.Thread(target=plain)
            thread.start()
            assert wait_until(lambda: engine.stats().num_running == 2)
            engine._loop.call_soon_threadsafe(engine.begin_drain, 0.2)
            events = sse_events(lines)
        thread.join(30)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "abort"
        body = results["plain"].json()
        assert results["plain"].status_code == 200 and body["choices"][0]["finish_reason"] == "abort"
        assert 0 < body["usage"]["completion_tokens"] < LONG_CHAT["max_tokens"]
        assert wait_until(lambda: engine_idle(server))
