"""Batched sampling: penalties, logit bias, temperature, top-k/top-p/min-p, seeds, logprobs.

Everything is a tensor op over the batch; work that no request in the batch asked for is
skipped.  Sampling inverts each row's CDF at one uniform draw: one random number per row
(noise for the whole vocabulary cost more than the model's LM head on CPU), drawn from
the request's own generator when it has a seed, so the same seed gives the same tokens
whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Per-row sampling settings, built by the model runner for the rows being sampled."""

    temperature: torch.Tensor  # [B] float; 0 = greedy
    top_p: torch.Tensor | None = None  # [B]; None when no row uses it
    top_k: torch.Tensor | None = None  # [B] long; 0 = off
    min_p: torch.Tensor | None = None  # [B]
    generators: list[torch.Generator | None] | None = None
    presence_penalty: torch.Tensor | None = None  # [B]
    frequency_penalty: torch.Tensor | None = None  # [B]
    repetition_penalty: torch.Tensor | None = None  # [B]
    output_token_ids: torch.Tensor | None = None  # [B, L] padded with -1 (for presence/frequency)
    seen_token_ids: torch.Tensor | None = None  # [B, L2] padded with -1 (prompt + output, for repetition)
    logit_bias: torch.Tensor | None = None  # [B, V] additive
    banned_token_mask: torch.Tensor | None = None  # [B, V] bool (e.g. EOS before min_tokens)
    num_logprobs: int | None = None  # top-k alternatives to return; None = no logprobs
    all_greedy: bool = False


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B]
    logprobs: torch.Tensor | None = None  # [B] chosen token logprob
    top_ids: torch.Tensor | None = None  # [B, k]
    top_logprobs: torch.Tensor | None = None  # [B, k]


def _token_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, L] ids padded with -1 -> [B, V] occurrence counts."""
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=ids.device)
    idx = torch.where(ids < 0, vocab, ids)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    vocab = logits.shape[1]
    if b.repetition_penalty is not None and b.seen_token_ids is not None:
        seen = _token_counts(b.seen_token_ids, vocab) > 0
        rp = b.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalised, logits)
    if b.output_token_ids is not None and (b.presence_penalty is not None or b.frequency_penalty is not None):
        counts = _token_counts(b.output_token_ids, vocab)
        if b.frequency_penalty is not None:
            logits = logits - b.frequency_penalty.unsqueeze(1) * counts
        if b.presence_penalty is not None:
            logits = logits - b.presence_penalty.unsqueeze(1) * (counts > 0).float()
    if b.logit_bias is not None:
        logits = logits + b.logit_bias
    if b.banned_token_mask is not None:
        logits = logits.masked_fill(b.banned_token_mask, NEG_INF)
    return logits


def _filter(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Mask tokens outside top-k / top-p / min-p (on temperature-scaled logits)."""
    if b.top_k is not None:
        k = b.top_k.clamp(min=0)
        k = torch.where(k == 0, logits.shape[1], k).clamp(max=logits.shape[1])
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if b.top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (keeps at least one).
        drop = (probs.cumsum(-1) - probs) >= b.top_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if b.min_p is not None:
        probs = logits.softmax(-1)
        threshold = b.min_p.unsqueeze(1) * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, NEG_INF)
    return logits


def _uniforms(rows: int, b: SamplingBatch, device: torch.device) -> torch.Tensor:
    """One U[0, 1) draw per row, float64; seeded rows draw from their own generator."""
    u = torch.rand(rows, dtype=torch.float64, device=device)
    if b.generators is not None:
        for row, gen in enumerate(b.generators):
            if gen is not None:
                u[row] = torch.rand((), dtype=torch.float64, device=device, generator=gen)
    return u


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative probability exceeds u (times the row's total).

    The cumulative sum is float64 so tail tokens keep their share; a zero-probability token
    adds nothing to the sum and so can never be the first to exceed it.
    """
    cdf = probs.double().cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def sample(logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    """logits [B, V] float32 -> sampled ids (and logprobs of the raw model distribution)."""
    out_logprobs = top_ids = top_lp = None
    raw_logprobs = torch.log_softmax(logits, dim=-1) if b.num_logprobs is not None else None
    logits = apply_penalties(logits, b)
    if b.all_greedy:
        token_ids = logits.argmax(dim=-1)
    else:
        temp = b.temperature.clamp(min=1e-5).unsqueeze(1)
        probs = _filter(logits / temp, b).softmax(-1)
        sampled = _inverse_cdf(probs, _uniforms(probs.shape[0], b, probs.device))
        # On CPU a host check is free and skips a vocabulary-wide argmax when no row is greedy.
        if logits.is_cpu and not bool((b.temperature == 0).any()):
            token_ids = sampled
        else:
            token_ids = torch.where(b.temperature == 0, logits.argmax(dim=-1), sampled)
    if raw_logprobs is not None:
        out_logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        if b.num_logprobs:
            top_lp, top_ids = raw_logprobs.topk(b.num_logprobs, dim=-1)
    return SamplerOutput(token_ids, out_logprobs, top_ids, top_lp)
