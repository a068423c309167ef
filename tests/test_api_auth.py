"""``--api-key``: /v1/* needs ``Authorization: Bearer KEY`` (compared in constant time);
/health and /metrics stay open; the key can come from the environment; default bind is loopback."""

from __future__ import annotations

import secrets

import httpx
import openai
import pytest

from pesc_serve.__main__ import parse_args
from pesc_serve.config import ServerConfig
from tests.server_harness import running_server

KEY = "sk-test-0123456789"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory):
    with running_server(str(tiny_checkpoint_factory("camelidae")), server=ServerConfig(api_key=KEY)) as s:
        yield s


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},  # no scheme
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer ünïcode".encode("latin-1")},
    ],
)
def test_missing_or_wrong_key_is_401(server, headers):
    for method, path, body in (
        ("POST", "/chat/completions", {"messages": MSG, "max_tokens": 1}),
        ("POST", "/completions", {"prompt": "x", "max_tokens": 1}),
        ("GET", "/models", None),
    ):
        r = httpx.request(method, server.v1 + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"


def test_auth_comes_before_validation(server):
    r = httpx.post(server.v1 + "/chat/completions", content=b"{broken", headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_right_key_works_with_the_openai_client(server):
    client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=60)
    r = client.chat.completions.create(model=server.server.model_name, messages=MSG, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0).models.list()


def test_health_and_metrics_stay_open(server):
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and "pesc:num_requests_running" in r.text


def test_key_is_compared_in_constant_time(server, monkeypatch):
    calls = []
    real = secrets.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(secrets, "compare_digest", spy)
    assert httpx.get(server.v1 + "/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.v1 + "/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert calls == [(b"Bearer wrong", f"Bearer {KEY}".encode()), (f"Bearer {KEY}".encode(), f"Bearer {KEY}".encode())]


def test_key_from_environment_and_loopback_default(monkeypatch):
    monkeypatch.setenv("PESC_SERVE_API_KEY", "from-env")
    args = parse_args([])
    assert args.api_key == "from-env"
    assert args.host == "127.0.0.1"
    assert parse_args(["--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("PESC_SERVE_API_KEY")
    assert parse_args([]).api_key is None
