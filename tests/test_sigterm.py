"""SIGTERM on a real ``python -m pesc_serve`` process: running requests (streaming and not)
finish normally, new connections are refused, and the process exits 0."""

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

# Long enough that the first request is still running when the second one arrives, even on a
# busy machine where the tiny model decodes a token in well under a millisecond.
MAX_TOKENS = 3000


@pytest.fixture
def server_process(tmp_path):
    port = free_port()
    model = make_checkpoint("camelidae", tmp_path / "ckpt", max_position_embeddings=4096)
    cmd = [
        sys.executable, "-m", "pesc_serve", "--model", str(model), "--port", str(port),
        "--dtype", "float32", "--device", "cpu", "--max-model-len", "4096", "--kv-cache-memory", "0.05",
        "--log-level", "warning", "--shutdown-timeout", "20",
    ]  # fmt: skip
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return proc.poll() is not None  # stop waiting if it died

    assert wait_until(healthy, 90, 0.2)
    if proc.poll() is not None:
        log.seek(0)
        pytest.fail(f"server exited early:\n{log.read()}")
    yield proc, url, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    log.close()


def test_sigterm_drains_running_requests_then_exits_0(server_process):
    proc, url, log = server_process
    body = {"prompt": [5, 9, 33, 41], "max_tokens": MAX_TOKENS, "ignore_eos": True}
    results: dict[str, object] = {}

    def non_streaming() -> None:
        results["plain"] = httpx.post(url + "/v1/completions", json=body, timeout=60)

    with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        plain = threading.Thread(target=non_streaming)
        plain.start()
        assert wait_until(lambda: scrape(url)[("pesc:num_requests_running", ())] == 2, 10)
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                httpx.get(url + "/health", timeout=1)
                return False
            except httpx.ConnectError:
                return True
            except httpx.RemoteProtocolError:  # accepted as the listener closed, then closed unanswered
                return False

        assert wait_until(refused, 5, 0.05), "the server still accepts connections after SIGTERM"
        events = [first[len("data: ") :]] + sse_events(lines)
    plain.join(60)

    assert events[-1] == "[DONE]"
    finishes = [e["choices"][0]["finish_reason"] for e in events[1:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    r = results["plain"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS

    t0 = time.monotonic()
    assert proc.wait(30) == 0
    assert time.monotonic() - t0 < 30
    log.seek(0)
    output = log.read()
    assert "Traceback" not in output, output
