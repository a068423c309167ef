"""``python -m pesc_serve.ray`` end to end: it starts its own local Ray cluster with two
replicas, serves, and on SIGTERM drains a running stream, exits 0 and leaves no Ray process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

from tests.fixtures.tiny_checkpoints import make_checkpoint  # noqa: E402
from tests.server_harness import free_port, wait_until  # noqa: E402

READY_S = 300


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_sigterm_drains_and_stops_every_ray_process(tmp_path):
    model = make_checkpoint("llama", tmp_path / "base", seed=5, max_position_embeddings=2048)
    port = free_port()
    log = (tmp_path / "cli.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pesc_serve.ray", "--model", str(model), "--num-replicas", "2", "--port", str(port),
         "--dtype", "float32", "--quantization", "none", "--cpu-kernels", "off", "--max-model-len", "2048",
         "--kv-cache-memory", "0.05", "--shutdown-timeout", "2", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "cli.log").read_text()[-4000:]
            try:
                r = httpx.get(url + "/health", timeout=30)
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.json()["replicas_ready"] == 2

        assert wait_until(ready, timeout_s=READY_S, interval_s=1)
        answer = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=120)
        assert answer.status_code == 200, answer.text
        ray_processes = _descendants(proc.pid)
        assert len(ray_processes) >= 4  # GCS, raylet, controller, proxy, replicas ...

        events: list = []
        first = threading.Event()

        def stream() -> None:
            body = {"prompt": "once upon a time", "max_tokens": 1500, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        first.set()
            first.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert first.wait(120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, (tmp_path / "cli.log").read_text()[-4000:]
        reader.join(timeout=60)
        assert events[-1] == "[DONE]", events[-2:]
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] in ("length", "abort"), last  # finished, or cut with its answer
        assert wait_until(lambda: not any(_alive(p) for p in ray_processes), timeout_s=60, interval_s=0.5), [
            Path(f"/proc/{p}/cmdline").read_bytes()[:60] for p in ray_processes if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        log.close()


def test_replicas_that_cannot_load_the_model_fail_the_command_cleanly(tmp_path):
    """A flag only a replica can check (the context length against the model's) stops the
    deployment after a few tries: one error line, exit 1, no Ray process left."""
    model = make_checkpoint("llama", tmp_path / "base", seed=5)  # context 256
    log = tmp_path / "cli.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pesc_serve.ray", "--model", str(model), "--port", str(free_port()),
             "--dtype", "float32", "--quantization", "none", "--max-model-len", "4096", "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    ray_processes: set[int] = set()

    def exited() -> bool:
        ray_processes.update(_descendants(proc.pid))
        return proc.poll() is not None

    try:
        assert wait_until(exited, timeout_s=READY_S, interval_s=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    output = log.read_text()
    assert proc.returncode == 1, output[-3000:]
    assert "error: Deploying application pesc failed" in output and "exceeds the model's context length" in output
    assert wait_until(lambda: not any(_alive(p) for p in ray_processes), timeout_s=60, interval_s=0.5)
