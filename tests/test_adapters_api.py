"""Many models over HTTP: ``model`` picks the delta, ``/v1/models`` lists them with their parent,
metrics are labelled by model, and ``--enable-runtime-adapters`` loads and unloads deltas."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from pesc_serve.config import ServerConfig
from tests.fixtures.tiny_checkpoints import make_checkpoint
from tests.fixtures.tiny_deltas import make_peft_lora, make_pesc_delta
from tests.profiles import load_config
from tests.server_harness import engine_idle, running_server, scrape, wait_until

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = "sk-test"


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_tenants")
    base = make_checkpoint("llama", root / "base", seed=5, tie_word_embeddings=False)
    return base, {
        "alpha": make_pesc_delta(root / "alpha", base, seed=1),
        "gamma": make_peft_lora(root / "gamma", base, seed=3),
        "beta": make_pesc_delta(root / "beta", base, seed=2, num_experts=6, topk=1, adapter_dim=16, lora_rank=0),
    }


@pytest.fixture(scope="module")
def server(tenants):
    base, deltas = tenants
    load = dataclasses.replace(load_config("defaults", str(base)),
                               adapters=(("alpha", str(deltas["alpha"])), ("gamma", str(deltas["gamma"]))))
    with running_server(str(base), load=load, profile="defaults",
                        server=ServerConfig(enable_runtime_adapters=True, api_key=KEY)) as s:
        s.headers = {"Authorization": f"Bearer {KEY}"}
        yield s


def _complete(server, model: str | None, prompt: str = "hello there", **kw) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **kw}
    if model is not None:
        body["model"] = model
    return httpx.post(server.v1 + "/completions", json=body, headers=server.headers, timeout=60)


def test_models_lists_every_model_with_its_parent(server, tenants):
    base_name = server.server.model_name
    r = httpx.get(server.v1 + "/models", headers=server.headers)
    cards = {m["id"]: m for m in r.json()["data"]}
    assert set(cards) == {base_name, "alpha", "gamma"}
    assert cards[base_name]["parent"] is None
    assert cards["alpha"]["parent"] == cards["gamma"]["parent"] == base_name
    assert cards["alpha"]["root"] == str(tenants[1]["alpha"])
    one = httpx.get(server.v1 + "/models/gamma", headers=server.headers)
    assert one.status_code == 200 and one.json()["id"] == "gamma"
    missing = httpx.get(server.v1 + "/models/nope", headers=server.headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_model_picks_the_delta_and_mixed_traffic_changes_nothing(server):
    base_name = server.server.model_name
    names = [base_name, "alpha", "gamma"]
    alone = {m: _complete(server, m).json() for m in names}
    assert all(alone[m]["model"] == m for m in names)
    texts = {m: alone[m]["choices"][0]["text"] for m in names}
    assert len(set(texts.values())) == 3, texts  # three different models
    assert _complete(server, None).json()["choices"][0]["text"] == texts[base_name]  # no model: the base
    with ThreadPoolExecutor(9) as pool:  # concurrent requests share steps across models
        mixed = list(pool.map(lambda m: (m, _complete(server, m).json()), names * 3))
    for m, body in mixed:
        assert body["choices"][0]["text"] == texts[m], m
    client = openai.OpenAI(base_url=server.v1, api_key=KEY)
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "alpha"


def test_an_unknown_model_is_a_404(server):
    r = _complete(server, "nope")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "`nope`" in err["message"]


def test_metrics_are_labelled_by_model(server):
    _complete(server, "gamma")
    assert wait_until(lambda: engine_idle(server))
    m = scrape(server.url)
    success = {dict(labels)["model"] for (name, labels), v in m.items() if name == "pesc:request_success_total" and v}
    assert {"gamma", server.server.model_name} <= success
    assert m[("pesc:generation_tokens_total", (("model", "gamma"),))] >= 8
    experts = {dict(labels)["model"] for (name, labels), _ in m.items() if name == "pesc:expert_tokens_total"}
    assert experts == {"alpha"}  # the only delta with experts among those served so far


def test_runtime_load_and_unload(server, tenants, tmp_path):
    deltas = tenants[1]
    post = lambda path, body: httpx.post(server.v1 + path, json=body, headers=server.headers, timeout=60)  # noqa: E731
    assert _complete(server, "beta").status_code == 404
    r = post("/load_lora_adapter", {"lora_name": "beta", "lora_path": str(deltas["beta"])})
    assert r.status_code == 200 and "beta" in r.text
    ids = [m["id"] for m in httpx.get(server.v1 + "/models", headers=server.headers).json()["data"]]
    assert "beta" in ids
    loaded = _complete(server, "beta")
    assert loaded.status_code == 200 and loaded.json()["model"] == "beta"
    assert loaded.json()["choices"][0]["text"] != _complete(server, None).json()["choices"][0]["text"]
    # a second load under the same name, and bad deltas, are 400s that change nothing
    again = post("/load_lora_adapter", {"lora_name": "beta", "lora_path": str(deltas["beta"])})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (corrupt / "adapter_model.safetensors").write_bytes(b"junk")
    for body, words in (({"lora_name": "x", "lora_path": str(tmp_path / "missing")}, "no such file"),
                        ({"lora_name": "x", "lora_path": str(corrupt)}, "corrupt"),
                        ({"lora_name": "x"}, "lora_path"), ({"lora_path": "y"}, "lora_name")):
        bad = post("/load_lora_adapter", body)
        assert bad.status_code == 400 and words in bad.json()["error"]["message"], (body, bad.text)
    assert _complete(server, "alpha").status_code == 200  # everything else still serves
    # unloading
    r = post("/unload_lora_adapter", {"lora_name": "beta"})
    assert r.status_code == 200
    assert _complete(server, "beta").status_code == 404
    assert post("/unload_lora_adapter", {"lora_name": "beta"}).status_code == 404
    base = post("/unload_lora_adapter", {"lora_name": server.server.model_name})
    assert base.status_code == 400 and "cannot be unloaded" in base.json()["error"]["message"]
    assert wait_until(lambda: engine_idle(server))


def test_runtime_endpoints_need_the_api_key(server, tenants):
    r = httpx.post(server.v1 + "/load_lora_adapter", json={"lora_name": "b", "lora_path": str(tenants[1]["beta"])})
    assert r.status_code == 401


def test_runtime_endpoints_are_off_by_default(tenants):
    base, deltas = tenants
    with running_server(str(base), profile="exact") as s:
        r = httpx.post(s.v1 + "/load_lora_adapter", json={"lora_name": "b", "lora_path": str(deltas["beta"])})
        assert r.status_code == 404 and "error" in r.json()  # an OpenAI error object
        assert [m["id"] for m in httpx.get(s.v1 + "/models").json()["data"]] == [s.server.model_name]
