"""The batched sampler: greedy, filters, penalties, bias, bans, seeds and logprobs."""

from __future__ import annotations

import torch

from pesc_serve.layers.sampler import SamplingBatch, apply_penalties, sample

V = 10


def _batch(b: int, **kw) -> SamplingBatch:
    base = SamplingBatch(temperature=torch.ones(b))
    for k, v in kw.items():
        setattr(base, k, v)
    return base


def test_greedy_rows_take_argmax_even_in_mixed_batch():
    logits = torch.randn(3, V)
    b = _batch(3, temperature=torch.tensor([0.0, 1.0, 0.0]))
    out = sample(logits, b)
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()


def test_top_k_one_is_greedy_and_top_p_tiny_is_greedy():
    logits = torch.randn(4, V)
    for b in (_batch(4, top_k=torch.ones(4, dtype=torch.long)), _batch(4, top_p=torch.full((4,), 1e-6))):
        for _ in range(5):
            assert torch.equal(sample(logits, b).token_ids, logits.argmax(-1))


def test_min_p_filters_unlikely_tokens():
    logits = torch.tensor([[5.0, 4.9] + [-10.0] * (V - 2)])
    b = _batch(1, min_p=torch.tensor([0.5]))
    seen = {int(sample(logits, b).token_ids) for _ in range(50)}
    assert seen <= {0, 1} and len(seen) == 2


def test_seeded_rows_reproduce_regardless_of_batch():
    logits = torch.randn(1, V).repeat(3, 1)
    g = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    alone = [int(sample(logits[:1], _batch(1, generators=[gen])).token_ids) for gen in [g()] for _ in range(8)]
    gen = g()
    mixed = []
    for _ in range(8):
        mixed.append(int(sample(logits, _batch(3, generators=[None, gen, None])).token_ids[1]))
    assert alone == mixed


def test_penalties_and_bias():
    logits = torch.zeros(1, V)
    b = _batch(
        1,
        presence_penalty=torch.tensor([1.0]),
        frequency_penalty=torch.tensor([0.5]),
        output_token_ids=torch.tensor([[3, 3, 4, -1]]),
    )
    out = apply_penalties(logits.clone(), b)
    assert out[0, 3] == -(1.0 + 2 * 0.5) and out[0, 4] == -(1.0 + 0.5) and out[0, 0] == 0
    rep = _batch(1, repetition_penalty=torch.tensor([2.0]), seen_token_ids=torch.tensor([[1, 2]]))
    out = apply_penalties(torch.tensor([[1.0, 2.0, -2.0] + [0.0] * (V - 3)]), rep)
    assert out[0, 1] == 1.0 and out[0, 2] == -4.0 and out[0, 0] == 1.0
    bias = torch.zeros(1, V)
    bias[0, 7] = 100
    assert int(sample(torch.randn(1, V), _batch(1, temperature=torch.zeros(1), logit_bias=bias)).token_ids) == 7


def test_banned_tokens_are_never_sampled():
    logits = torch.zeros(1, V)
    logits[0, 2] = 50
    ban = torch.zeros(1, V, dtype=torch.bool)
    ban[0, 2] = True
    assert int(sample(logits, _batch(1, temperature=torch.zeros(1), banned_token_mask=ban)).token_ids) != 2


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(2, V)
    out = sample(logits, _batch(2, temperature=torch.zeros(2), num_logprobs=3))
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    assert torch.allclose(out.top_logprobs, ref.topk(3).values)


def test_sampled_frequencies_match_the_distribution():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0, 0.0, 0.0, 0.0])
    logits = probs.log().repeat(20000, 1)  # zero-probability tokens are -inf, first and last included
    torch.manual_seed(0)
    ids = sample(logits, _batch(20000)).token_ids
    freq = torch.bincount(ids, minlength=V).float() / ids.numel()
    assert set(ids.unique().tolist()) == {1, 3, 4, 5}
    assert torch.allclose(freq, probs, atol=0.015)


def test_temperature_sharpens_and_top_p_cuts_the_tail():
    logits = torch.tensor([[2.0, 1.0, 0.0] + [-30.0] * (V - 3)]).repeat(5000, 1)
    torch.manual_seed(1)
    cold = torch.bincount(sample(logits, _batch(5000, temperature=torch.full((5000,), 0.25))).token_ids, minlength=V)
    assert cold[0] / 5000 > 0.95  # e^4 : e^0 odds at T = 0.25
    nucleus = sample(logits, _batch(5000, top_p=torch.full((5000,), 0.7))).token_ids
    assert set(nucleus.unique().tolist()) == {0, 1}  # p = 0.67, 0.24, 0.09: the third is outside 0.7
