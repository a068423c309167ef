"""Scoring prompts, as evaluation harnesses do: ``prompt_logprobs`` (vLLM's extension),
completions ``echo`` with ``logprobs``, and ``max_tokens: 0`` (score only).

Each prompt token's logprob must be the model's own for that token after the tokens before it:
checked against teacher forcing (the prefix as a prompt, the next token forced by logit_bias;
logprobs are those of the raw distribution), with chunked prefill and after a cached prefix."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from pesc_serve.config import EngineConfig
from pesc_serve.engine.request import FinishReason, SamplingParams
from pesc_serve.launcher import build_engine
from tests.profiles import load_config, with_profile
from tests.server_harness import running_server, sse_events

PROMPT = [5, 9, 33, 41, 7, 120, 64, 11, 200, 3, 77, 18]


def _tolerance(profile: str) -> float:
    return 1e-4 if profile == "exact" else 2e-3  # int8 activations: rounding shifts with the row's context


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_factory, profile):
    model = str(tiny_checkpoint_factory("camelidae"))
    sizes = EngineConfig(max_num_seqs=8, max_model_len=128, kv_cache_memory_gb=0.02, max_num_batched_tokens=5)
    return build_engine(load_config(profile, model), with_profile(profile, sizes)), profile


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    last = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                last.setdefault(out.request_id, {})["prompt"] = out.prompt_logprobs
            last.setdefault(out.request_id, {}).setdefault("logprobs", []).extend(out.logprobs)
            if out.finished:
                last[out.request_id]["out"] = out
    return last


def test_prompt_logprobs_are_teacher_forced_logprobs(engine):
    engine, profile = engine
    got = _run(engine, {"p": (PROMPT, SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=3))})["p"]
    scores = got["prompt"]
    assert got["out"].finish_reason == FinishReason.LENGTH and got["out"].num_output_tokens == 0
    assert len(scores) == len(PROMPT) and scores[0] is None
    forced = {f"f{j}": (PROMPT[:j], SamplingParams(max_tokens=1, temperature=0, logprobs=0,
                                                   logit_bias={PROMPT[j]: 100.0}, ignore_eos=True))
              for j in range(1, len(PROMPT))}
    ref = _run(engine, forced)
    for j in range(1, len(PROMPT)):
        s = scores[j]
        want = ref[f"f{j}"]["logprobs"][0]
        assert want.token_id == PROMPT[j] == s.token_id
        assert s.logprob == pytest.approx(want.logprob, abs=_tolerance(profile))
        assert len(s.top) == 3 and s.top[0][1] >= s.top[-1][1] and s.rank >= 1
        if s.rank == 1:  # the likeliest token: the top alternative's logprob is its own
            assert math.isclose(s.top[0][1], s.logprob, abs_tol=1e-6)


def test_a_cached_prefix_does_not_cut_the_scores_short(engine):
    engine, _ = engine
    long = PROMPT * 4  # several full KV blocks
    warm = _run(engine, {"warm": (long, SamplingParams(max_tokens=1, temperature=0))})["warm"]
    again = _run(engine, {"again": (long, SamplingParams(max_tokens=1, temperature=0))})["again"]
    assert again["out"].num_cached_tokens > 0 and warm["out"].num_cached_tokens == 0  # the prefix is cached
    a = _run(engine, {"a": (long, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0))})["a"]
    b = _run(engine, {"b": (long, SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=0))})["b"]
    assert len(a["prompt"]) == len(long) == len(b["prompt"])
    assert [s.logprob for s in a["prompt"][1:]] == pytest.approx([s.logprob for s in b["prompt"][1:]], abs=1e-6)
    assert a["out"].num_output_tokens == 2


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory, profile):
    with running_server(str(tiny_checkpoint_factory("camelidae")), profile=profile) as s:
        yield s


def _complete(server, **body) -> dict:
    r = httpx.post(server.v1 + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt(server):
    """lm-evaluation-harness's loglikelihood request."""
    body = _complete(server, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, temperature=0)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    assert len(lp["tokens"]) == len(PROMPT) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    scored = _complete(server, prompt=PROMPT, max_tokens=0, prompt_logprobs=1, temperature=0)["choices"][0]
    vllm = scored["prompt_logprobs"]
    assert vllm[0] is None and len(vllm) == len(PROMPT)
    for j in range(1, len(PROMPT)):
        entry = vllm[j][str(PROMPT[j])]
        assert entry["logprob"] == pytest.approx(lp["token_logprobs"][j], abs=1e-5) and entry["rank"] >= 1
    assert scored["text"] == ""


def test_echo_with_logprobs_then_generation_continues_the_offsets(server):
    body = _complete(server, prompt=PROMPT, echo=True, logprobs=2, max_tokens=4, temperature=0)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(PROMPT) + 4
    assert lp["token_logprobs"][0] is None and all(x is not None for x in lp["token_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])
    with httpx.stream("POST", server.v1 + "/completions", timeout=60,
                      json={"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0,
                            "stream": True}) as r:
        events = [e for e in sse_events(r) if e != "[DONE]"]
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for e in events:
        for ch in e["choices"]:
            for k in streamed:
                streamed[k] += (ch["logprobs"] or {}).get(k, [])
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)


def test_chat_prompt_logprobs(server):
    r = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, "prompt_logprobs": 0})
    choice = r.json()["choices"][0]
    n = r.json()["usage"]["prompt_tokens"]
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == n
    assert all(len(e) == 1 for e in choice["prompt_logprobs"][1:])


def test_the_openai_client_scores_a_continuation(server):
    client = openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=60)
    out = client.completions.create(model=server.server.model_name, prompt=PROMPT, echo=True, logprobs=1,
                                    max_tokens=0, temperature=0)
    lps = out.choices[0].logprobs.token_logprobs
    assert lps[0] is None and sum(lps[-3:]) < 0
