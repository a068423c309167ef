"""pesc-serve on Ray Serve: two engine replicas behind one OpenAI endpoint, on a local cluster.

One cluster for the module (``ray.init(num_cpus=2)``, one CPU per replica) serving a tiny
random base and two tiny deltas, with room for one delta per replica.  Requests spread over
both replicas, streams pass through Serve, a delta sticks to the replica that loaded it, and a
replica killed under load costs only its own requests (each ending in an OpenAI error) before
Serve brings the count back to two.  Every wait polls a condition with a generous bound.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from pesc_serve.config import ServerConfig  # noqa: E402
from pesc_serve.ray.app import build_app  # noqa: E402
from pesc_serve.ray.config import RayServeConfig, replica_spec, serve_env_defaults  # noqa: E402
from tests.fixtures.tiny_checkpoints import make_checkpoint  # noqa: E402
from tests.fixtures.tiny_deltas import make_pesc_delta  # noqa: E402
from tests.profiles import engine_config, load_config  # noqa: E402
from tests.server_harness import free_port, scrape, sse_events, wait_until  # noqa: E402

READY_S = 300  # a replica (re)starting on two busy cores: Ray worker, torch import, model load
LONG = 1000  # tokens of a request that must still be running when its replica is killed


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_tenants")
    base = make_checkpoint("llama", root / "base", seed=5, tie_word_embeddings=False, max_position_embeddings=2048)
    return base, {"alpha": make_pesc_delta(root / "alpha", base, seed=1),
                  "beta": make_pesc_delta(root / "beta", base, seed=2)}


@pytest.fixture(scope="module")
def url(tenants):
    """The endpoint of a two-replica application; Serve and the cluster stop after the module."""
    base, deltas = tenants
    load = dataclasses.replace(load_config("exact", str(base)), adapters=tuple((n, str(p)) for n, p in deltas.items()))
    engine = engine_config("exact", max_num_seqs=8, max_model_len=LONG + 256, kv_cache_memory_gb=0.05,
                           max_loaded_adapters=1)
    ray_cfg = RayServeConfig(num_replicas=2)
    spec = replica_spec(load, engine, ServerConfig(shutdown_timeout_s=5), None, ray_cfg, num_cpus=1.0)
    port = free_port()
    env = pytest.MonkeyPatch()
    for name, value in serve_env_defaults(os.environ).items():  # what `python -m pesc_serve.ray` runs with
        env.setenv(name, value)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(spec, ray_cfg), name="pesc-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        env.undo()


def _health(url: str) -> tuple[int, dict]:
    try:
        r = httpx.get(url + "/health", timeout=60)
    except httpx.HTTPError:
        return 0, {}
    return r.status_code, r.json()


def _replicas(url: str) -> dict[str, dict]:
    status, body = _health(url)
    return {r["replica"]: r for r in body.get("replicas", [])} if status == 200 else {}


def _complete(url: str, model: str | None = None, max_tokens: int = 8, **kw) -> httpx.Response:
    body = {"prompt": "hello there", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}
    if model is not None:
        body["model"] = model
    return httpx.post(url + "/v1/completions", json=body, timeout=600)


class Stream:
    """A streamed chat completion read on its own thread; ``started`` once the first event is in."""

    def __init__(self, url: str, max_tokens: int, model: str | None = None) -> None:
        self.started = threading.Event()
        self.replica: str | None = None
        self.events: list = []
        body = {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": max_tokens,
                "stream": True, "ignore_eos": True, **({"model": model} if model else {})}
        self.thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self.thread.start()

    def _read(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
                self.replica = r.headers.get("x-pesc-replica")
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        payload = line[len("data: "):]
                        self.events.append(payload if payload == "[DONE]" else json.loads(payload))
                        self.started.set()
        finally:
            self.started.set()

    def join(self) -> list:
        self.thread.join(timeout=600)
        assert not self.thread.is_alive(), "the stream never ended"
        return self.events


def test_health_lists_two_ready_replicas_each_with_its_cpu_share(url):
    status, body = _health(url)
    assert status == 200, body
    assert body["replicas_ready"] == 2
    replicas = body["replicas"]
    assert len({r["pid"] for r in replicas}) == 2  # one engine per process
    for r in replicas:
        assert r["num_cpus"] == 1.0 and r["torch_threads"] == 1 and r["omp_num_threads"] == "1", r
        assert r["device"] == "cpu" and r["healthy"]


def test_requests_land_on_both_replicas(url):
    seen: set[str] = set()

    def batch() -> bool:
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: _complete(url, max_tokens=24), range(6)))
        for r in responses:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length"
            seen.add(r.headers["x-pesc-replica"])
        return len(seen) == 2

    assert wait_until(batch, timeout_s=READY_S, interval_s=0), seen
    assert set(_replicas(url)) == seen


def test_streaming_through_serve_matches_the_plain_answer(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="base", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="base", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True},
                      timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"


def test_a_delta_sticks_to_the_replica_that_loaded_it(url):
    """One delta slot per replica: once Serve knows where alpha and beta are loaded, each of
    their requests goes back there (a replica chosen at random would miss 1 time in 2)."""

    def replica_of(model: str) -> str:
        r = _complete(url, model)
        assert r.status_code == 200 and r.json()["model"] == model, r.text
        return r.headers["x-pesc-replica"]

    homes: dict[str, str] = {}

    def settled() -> bool:  # Serve learns a replica's deltas within a fraction of a second
        for model in ("alpha", "beta"):
            previous, homes[model] = homes.get(model), replica_of(model)
            if previous != homes[model]:
                return False
        return True

    assert wait_until(settled, timeout_s=READY_S, interval_s=0.5)
    for _ in range(4):
        for model in ("alpha", "beta"):
            assert replica_of(model) == homes[model], (model, homes)
    assert replica_of("base") in _replicas(url)  # the base goes anywhere
    replicas = _replicas(url)
    for model, home in homes.items():
        assert model in replicas[home]["resident_deltas"], replicas


def test_metrics_carry_each_replicas_engine_metrics(url):
    for _ in range(4):
        assert _complete(url).status_code == 200
    samples = scrape(url)
    up = {dict(labels)["replica"]: value for (name, labels), value in samples.items() if name == "pesc:replica_up"}
    assert set(up) == set(_replicas(url)) and set(up.values()) == {1.0}
    generated = {dict(labels)["replica"] for (name, labels), value in samples.items()
                 if name == "pesc:generation_tokens_total" and value > 0}
    assert generated and generated <= set(up)
    assert all(("pesc:kv_cache_usage_perc", (("replica", r),)) in samples for r in up)


def test_bad_requests_get_openai_errors_through_serve(url):
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = _complete(url, model="nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url + "/v1/completions", content=b"x" * (9 << 20), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "base"


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(url):
    before = _replicas(url)
    assert len(before) == 2
    streams: list[Stream] = []

    def both_busy() -> bool:  # start long streams until each replica runs two
        stream = Stream(url, LONG)
        streams.append(stream)
        assert stream.started.wait(300) and stream.replica, stream.events
        per_replica = [sum(1 for s in streams if s.replica == r) for r in before]
        return min(per_replica) >= 2 or len(streams) >= 12

    wait_until(both_busy, timeout_s=READY_S, interval_s=0)
    assert {s.replica for s in streams} == set(before), "every stream went to one replica"
    in_flight = {r: info["in_flight"] for r, info in _replicas(url).items()}
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(_complete, url, None, LONG)
        grown: dict[str, int] = {}

        def plain_started() -> bool:  # the plain request is in an engine: on which replica?
            now = {r: info["in_flight"] for r, info in _replicas(url).items()}
            grown.update({r: n for r, n in now.items() if n > in_flight.get(r, 0)})
            return bool(grown)

        assert wait_until(plain_started, timeout_s=120, interval_s=0.05)
        victim = next(iter(grown))
        os.kill(before[victim]["pid"], signal.SIGKILL)
        plain_response = plain.result(timeout=600)

    assert plain_response.status_code == 503, plain_response.text
    assert plain_response.json()["error"]["code"] == "replica_unavailable"
    for stream in streams:
        events = stream.join()
        assert events[-1] == "[DONE]", events[-3:]
        if stream.replica == victim:
            assert "error" in events[-2] and events[-2]["error"]["code"] == "replica_unavailable", events[-2]
        else:
            assert events[-2]["choices"][0]["finish_reason"] == "length", events[-2]

    def back_to_two() -> bool:
        now = _replicas(url)
        return len(now) == 2 and victim not in now and all(r["healthy"] for r in now.values())

    assert wait_until(back_to_two, timeout_s=READY_S, interval_s=1)
    assert _complete(url).status_code == 200
