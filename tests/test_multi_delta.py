"""Many deltas over one base in one engine: mixed batches, prefix-cache isolation, residency.

Three deltas of different shapes (a PESC delta with experts and LoRA, a PESC delta with
other experts and no LoRA, a plain PEFT LoRA) are served beside their tiny base.  Every
request must get exactly what its model gives when it runs alone, however the steps mix
models: on the PyTorch path (``exact``) and through the C++ decode step (``defaults``).
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from pesc_serve.deltas.served_models import UnknownModelError
from pesc_serve.engine.request import FinishReason, SamplingParams
from pesc_serve.launcher import build_engine
from tests.fixtures.tiny_checkpoints import make_checkpoint
from tests.fixtures.tiny_deltas import make_peft_lora, make_pesc_delta
from tests.profiles import engine_config, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[5, 9, 33, 41, 8, 17, 3, 90, 12], [70, 11, 8], [19, 3, 77, 5, 5, 6, 40, 2, 9, 9, 31, 4, 8, 61],
           [44, 45, 46, 47], [100, 3, 200, 5, 300, 7, 250, 9]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    """(base dir, {name: delta dir}) over a tiny dense Llama."""
    root = tmp_path_factory.mktemp("tenants")
    base = make_checkpoint("llama", root / "base", seed=5, tie_word_embeddings=False)
    deltas = {
        "alpha": make_pesc_delta(root / "alpha", base, seed=1),  # E4 top-2, r 8, LoRA everywhere
        "beta": make_pesc_delta(root / "beta", base, seed=2, num_experts=6, topk=1, adapter_dim=16, lora_rank=0),
        "gamma": make_peft_lora(root / "gamma", base, seed=3),  # LoRA on q, v, down only
    }
    return base, deltas


def _engine(profile, tenants, **sizes):
    base, deltas = tenants
    load = dataclasses.replace(load_config(profile, str(base)), adapters=tuple((n, str(p)) for n, p in deltas.items()))
    cfg = dict(max_num_seqs=32, max_model_len=128, kv_cache_memory_gb=0.02, block_size=4)
    cfg.update(sizes)
    return build_engine(load, engine_config(profile, **cfg))


def _run(engine, requests, stagger: bool = False) -> dict[str, tuple[list[int], list[float]]]:
    """Run (request id, model, prompt) to the end; with ``stagger`` half of them join mid-run."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    late = requests[len(requests) // 2:] if stagger else []
    for rid, model, prompt in requests[: len(requests) - len(late)]:
        engine.add_request(rid, prompt, GREEDY, model)
    steps = 0
    while engine.has_unfinished() or late:
        if late and steps == 3:
            for rid, model, prompt in late:
                engine.add_request(rid, prompt, GREEDY, model)
            late = []
        for o in engine.step():
            assert o.error is None, o.error
            tokens, lps = out.setdefault(o.request_id, ([], []))
            tokens.extend(o.new_token_ids)
            lps.extend(lp.logprob for lp in o.logprobs)
        steps += 1
    return out


@pytest.fixture(scope="module", params=["exact", "defaults"])
def served(request, tenants):
    """(profile, engine, solo answers {(model, prompt index): (tokens, logprobs)})."""
    engine = _engine(request.param, tenants)
    names = [m.name for m in engine.models.listed()]
    solo = {}
    for model in names:
        for i, prompt in enumerate(PROMPTS):
            solo[(model, i)] = _run(engine, [("solo", model, prompt)])["solo"]
    return request.param, engine, solo


def test_every_delta_changes_the_base(served):
    _, engine, solo = served
    base = engine.models.primary.name
    for name in ("alpha", "beta", "gamma"):
        assert any(solo[(name, i)][0] != solo[(base, i)][0] for i in range(len(PROMPTS))), name


@pytest.mark.parametrize("stagger", [False, True])
def test_mixed_batches_match_each_model_alone(served, stagger):
    """Every step mixes the base and three deltas (different expert counts, top-k, adapter
    sizes, LoRA or none); each request's tokens and logprobs are its model's solo ones."""
    profile, engine, solo = served
    names = [m.name for m in engine.models.listed()]
    assert len(names) == 4
    requests = [(f"{m}-{i}", m, p) for i, p in enumerate(PROMPTS) for m in names]
    got = _run(engine, requests, stagger)
    for rid, model, _ in requests:
        i = int(rid.rsplit("-", 1)[1])
        tokens, lps = got[rid]
        want_tokens, want_lps = solo[(model, i)]
        assert tokens == want_tokens, (profile, rid)
        assert torch.allclose(torch.tensor(lps), torch.tensor(want_lps), atol=1e-4), (profile, rid)
    if profile == "defaults" and engine.runner.decode_model is not None:
        assert engine.config.cpu_kernels == "auto"  # the decodes above ran through the C++ step


def test_expert_load_is_counted_per_model(served):
    _, engine, _ = served
    counts = engine.expert_load.snapshot()
    assert set(counts) == {"alpha", "beta"}  # the base and the LoRA-only delta have no experts
    assert counts["alpha"].shape == (2, 4) and counts["beta"].shape == (2, 6)
    assert int(counts["alpha"].sum()) > 0 and int(counts["beta"].sum()) > 0
    # beta is top-1: each of its routed tokens counts once per layer
    assert int(counts["beta"][0].sum()) == int(counts["beta"][1].sum())


def test_the_prefix_cache_never_shares_kv_between_models(tenants):
    """The same prompt sent to the base first, then to a delta: the delta computes its own KV
    (its answer is its solo one); a second base request does reuse the base's."""
    prompt = PROMPTS[2] + PROMPTS[0]  # several full blocks of 4
    engine = _engine("defaults", tenants)
    fresh = _engine("defaults", tenants, enable_prefix_caching=False)
    want = _run(fresh, [("a", "alpha", prompt)])["a"][0]

    def cached_tokens(rid, model):
        engine.add_request(rid, prompt, GREEDY, model)
        cached, tokens = 0, []
        while engine.has_unfinished():
            for o in engine.step():
                cached, tokens = o.num_cached_tokens, tokens + o.new_token_ids
        return cached, tokens

    assert cached_tokens("b1", None)[0] == 0
    cached, tokens = cached_tokens("a1", "alpha")
    assert cached == 0 and tokens == want
    assert cached_tokens("b2", None)[0] > 0  # the base's own blocks are still found
    assert cached_tokens("a2", "alpha")[0] > 0  # and alpha's own


def test_unknown_models_are_refused(served):
    _, engine, _ = served
    with pytest.raises(UnknownModelError, match="`nope` does not exist"):
        engine.add_request("x", PROMPTS[0], GREEDY, "nope")
    assert not engine.has_unfinished()


def test_an_evicted_delta_is_read_again_without_stalling_the_others(tenants, monkeypatch):
    """One slot for three deltas: a request for a non-resident delta waits while its delta is
    read off the engine thread; the base keeps decoding meanwhile; its answer is its solo one."""
    engine = _engine("defaults", tenants, max_loaded_adapters=1)
    resident = [m.name for m in engine.models.listed() if m.is_resident]
    assert resident == [engine.models.primary.name, "gamma"]  # the last one added holds the slot
    reference = _engine("defaults", tenants)
    want = _run(reference, [("r", "alpha", PROMPTS[0])])["r"][0]

    gate = threading.Event()
    read = engine.models.read

    def slow_read(source):
        assert gate.wait(60), "the test never released the read"
        delta = read(source)
        if engine.deltas.kernels is not None and engine.deltas.kernels.stacks is not None:
            # packed for the grouped kernel here, on the loader thread, not between two steps
            assert all(e.packed is not None for e in delta.experts)
        return delta

    monkeypatch.setattr(engine.models, "read", slow_read)
    engine.add_request("base", PROMPTS[1], GREEDY)
    engine.add_request("alpha", PROMPTS[0], GREEDY, "alpha")
    base_done = False
    alpha_tokens: list[int] = []
    steps = 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == "base" and o.finished:
                base_done = True
                assert not alpha_tokens  # the base finished while alpha's delta was still being read
                gate.set()
            if o.request_id == "alpha":
                alpha_tokens.extend(o.new_token_ids)
        steps += 1
        assert steps < 10_000
    assert base_done and alpha_tokens == want
    assert engine.models.num_loads == 1
    assert [m.name for m in engine.models.listed() if m.is_resident] == [engine.models.primary.name, "alpha"]


def test_a_delta_in_use_is_never_evicted(tenants):
    """With its one slot held by a running request, another delta's request waits until it
    finishes, then runs with its own answer."""
    engine = _engine("exact", tenants, max_loaded_adapters=1)
    reference = _engine("exact", tenants)
    want = {m: _run(reference, [("r", m, PROMPTS[3])])["r"][0] for m in ("gamma", "beta")}
    got = _run(engine, [("g", "gamma", PROMPTS[3]), ("b", "beta", PROMPTS[3])])
    assert got["g"][0] == want["gamma"] and got["b"][0] == want["beta"]


def test_unloading_a_delta_lets_its_running_requests_finish(tenants):
    engine = _engine("defaults", tenants)
    alpha = engine.models.get("alpha")
    slot = alpha.slot
    engine.add_request("r", PROMPTS[0], GREEDY, "alpha")
    for _ in range(3):
        engine.step()
    engine.models.remove("alpha")
    with pytest.raises(UnknownModelError):
        engine.add_request("late", PROMPTS[0], GREEDY, "alpha")
    assert alpha.is_resident  # still serving its running request
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    last = [o for o in outs if o.request_id == "r"][-1]
    assert last.finished and last.finish_reason == FinishReason.LENGTH and last.num_output_tokens == 10
    assert not alpha.is_resident and slot not in engine.deltas.resident
    assert "alpha" not in [m.name for m in engine.models.listed()]
    assert all(slot not in layer.mlp.experts for layer in engine.runner.model.layers)
