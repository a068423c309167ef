"""Schema-driven fuzzing (schemathesis) of our own /openapi.json against a live tiny server:
valid and invalid bodies for every operation, and not one 5xx.  Bounded: a fixed number of
examples per operation, derandomized, a short context so no request can run long."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from pesc_serve.config import EngineConfig
from tests.server_harness import engine_idle, running_server, wait_until

MAX_EXAMPLES = 50


@pytest.fixture(scope="module")
def fuzz_server(tiny_checkpoint_factory):
    engine = EngineConfig(max_num_seqs=16, max_queue_len=64, max_model_len=48, kv_cache_memory_gb=0.05)
    with running_server(str(tiny_checkpoint_factory("camelidae")), engine=engine) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


# Listed, not discovered, so each gets its own test id; test_every_operation_is_fuzzed keeps the
# list complete.  (schemathesis' own pytest plugin does not run under pytest 9.)
OPERATIONS = (
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "GET /health",
    "GET /metrics",
    "POST /tokenize",
    "POST /detokenize",
    "GET /version",
)


CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in OPERATIONS if label.startswith("POST")  # the others take no input
]


@pytest.mark.parametrize("label,mode", CASES, ids=[f"{label} {mode.value}" for label, mode in CASES])
def test_no_server_errors(api_schema, label, mode):
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=api_schema[label].as_strategy(generation_mode=mode))
    def run(case) -> None:
        case.call_and_validate(checks=[not_a_server_error], timeout=30)

    run()


def test_every_operation_is_fuzzed(api_schema):
    assert set(api_schema) == set(OPERATIONS)


def test_openapi_describes_the_bodies(fuzz_server):
    import httpx

    spec = httpx.get(fuzz_server.url + "/openapi.json").json()
    bodies = spec["components"]["schemas"]
    chat = bodies["ChatCompletionRequest"]["properties"]
    for field in ("messages", "n", "seed", "stop", "logprobs", "top_logprobs", "response_format", "stream_options",
                  "max_completion_tokens", "logit_bias", "min_tokens", "ignore_eos", "stop_token_ids"):  # fmt: skip
        assert field in chat, field
    assert "prompt" in bodies["CompletionRequest"]["properties"]
    assert set(spec["paths"]) >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


def test_server_is_idle_after_fuzzing(fuzz_server):
    assert wait_until(lambda: engine_idle(fuzz_server))
