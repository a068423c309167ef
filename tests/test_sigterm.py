"""SIGTERM on a real ``python -m pesc_serve`` process with its default flags: new connections
are refused at once; a request that can finish within ``--shutdown-timeout`` finishes
normally; those that cannot end *with an answer* when the drain is over (a stream's final
chunk says ``abort`` and ``[DONE]`` follows, a plain request gets its partial completion with
``abort``), and the process exits 0.

Nothing here races the machine's speed: the long requests ask for 60,000 tokens, which no
2-core machine generates in the drain time, and the short one for 100, which any does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.fixtures.tiny_checkpoints import make_checkpoint
from tests.server_harness import free_port, scrape, sse_events, wait_until

CONTEXT = 65536
LONG, SHORT = 60000, 100
DRAIN_S = 12.0


@pytest.fixture
def server_process(tmp_path):
    port = free_port()
    model = make_checkpoint("camelidae", tmp_path / "ckpt", max_position_embeddings=CONTEXT)
    cmd = [
        sys.executable, "-m", "pesc_serve", "--model", str(model), "--port", str(port), "--device", "cpu",
        "--max-model-len", str(CONTEXT), "--kv-cache-memory", "0.2", "--log-level", "info",
        "--shutdown-timeout", str(DRAIN_S),
    ]  # fmt: skip
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return proc.poll() is not None  # stop waiting if it died

    assert wait_until(healthy, 120, 0.2)
    if proc.poll() is not None:
        log.seek(0)
        pytest.fail(f"server exited early:\n{log.read()}")
    yield proc, url, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    log.close()


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=1)
        return False
    except httpx.ConnectError:
        return True
    except (httpx.RemoteProtocolError, httpx.ReadError):  # accepted as the listener closed, then closed or reset unanswered
        return False


def _finishes(events: list) -> list[str]:
    return [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"]]


def test_sigterm_drains_then_answers_what_is_left_and_exits_0(server_process):
    proc, url, log = server_process
    long_body = {"prompt": [5, 9, 33, 41], "max_tokens": LONG, "ignore_eos": True}
    results: dict[str, object] = {}

    def plain_long() -> None:
        results["plain"] = httpx.post(url + "/v1/completions", json=long_body, timeout=120)

    def short_stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=dict(long_body, max_tokens=SHORT, stream=True), timeout=120) as r:
            results["short"] = sse_events(r)

    with httpx.stream("POST", url + "/v1/completions", json=dict(long_body, stream=True), timeout=120) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        plain = threading.Thread(target=plain_long)
        plain.start()
        assert wait_until(lambda: scrape(url)[("pesc:num_requests_running", ())] == 2, 30)
        short = threading.Thread(target=short_stream)
        short.start()
        assert wait_until(lambda: scrape(url)[("pesc:num_requests_running", ())] == 3 or "short" in results, 30)
        proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        assert wait_until(lambda: _refused(url), 5, 0.05), "the server still accepts connections after SIGTERM"
        events = sse_events([first] + list(lines))
    plain.join(120)
    short.join(120)
    exit_code = proc.wait(60)
    elapsed = time.monotonic() - t_signal

    # the long stream: cut by the drain, yet a final chunk with "abort", then [DONE]
    assert events[-1] == "[DONE]"
    assert not any("error" in e for e in events[:-1] if isinstance(e, dict))
    assert _finishes(events) == ["abort"]
    assert sum(len(e["choices"][0]["text"]) for e in events[:-1] if e.get("choices")) > 0
    # the long plain request: its partial completion, labelled "abort"
    r = results["plain"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "abort"
    assert 0 < r.json()["usage"]["completion_tokens"] < LONG
    # the short stream finished normally within the drain
    assert results["short"][-1] == "[DONE]" and _finishes(results["short"]) == ["length"]
    # the process waited for the drain, not much longer, and exited cleanly
    assert exit_code == 0
    assert DRAIN_S - 1 <= elapsed < DRAIN_S + 30
    log.seek(0)
    output = log.read()
    assert "Traceback" not in output and "ASGI callable returned without completing response" not in output, output
    assert "aborting 2 request(s)" in output, output
