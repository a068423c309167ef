"""``--router prefix`` inside Serve: three replicas, and each prompt lands on one of the two
replicas its first characters hash to (pesc_serve/ray/routing.py), as the ingress's router
computes it."""

from __future__ import annotations

import json
import os

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from pesc_serve.config import ServerConfig  # noqa: E402
from pesc_serve.ray.app import build_app  # noqa: E402
from pesc_serve.ray.config import RayServeConfig, replica_spec, serve_env_defaults  # noqa: E402
from pesc_serve.ray.forwarding import read_call  # noqa: E402
from pesc_serve.ray.routing import PREFERRED, rendezvous_order  # noqa: E402
from tests.fixtures.tiny_checkpoints import make_checkpoint  # noqa: E402
from tests.profiles import engine_config, load_config  # noqa: E402
from tests.server_harness import free_port, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    base = make_checkpoint("llama", tmp_path_factory.mktemp("ray_router") / "base", seed=5)
    ray_cfg = RayServeConfig(num_replicas=3, router="prefix")
    spec = replica_spec(load_config("exact", str(base)), engine_config("exact", max_num_seqs=4, max_model_len=256,
                                                                       kv_cache_memory_gb=0.02),
                        ServerConfig(shutdown_timeout_s=5), None, ray_cfg, num_cpus=1.0)
    port = free_port()
    env = pytest.MonkeyPatch()
    for name, value in serve_env_defaults(os.environ).items():  # what `python -m pesc_serve.ray` runs with
        env.setenv(name, value)
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(spec, ray_cfg), name="pesc-router", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        env.undo()


def test_a_prompt_goes_to_one_of_the_two_replicas_its_prefix_hashes_to(url):
    def replicas() -> list[str]:
        r = httpx.get(url + "/health", timeout=60)
        return [x["replica"] for x in r.json()["replicas"]] if r.status_code == 200 else []

    assert wait_until(lambda: len(replicas()) == 3, timeout_s=300, interval_s=1)
    ids = replicas()
    used: set[str] = set()
    for i in range(9):
        body = {"messages": [{"role": "system", "content": f"You are assistant number {i}."},
                             {"role": "user", "content": "hello"}], "max_tokens": 4}
        key = read_call("POST", "/v1/chat/completions", b"", [], json.dumps(body).encode(), None).prefix_key
        preferred = rendezvous_order(key, ids)[:PREFERRED]
        for _ in range(3):
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.headers["x-pesc-replica"] in preferred, (key, preferred)
            used.add(r.headers["x-pesc-replica"])
    assert len(used) >= 2  # different prefixes, different replicas
