"""Answer-only language-model loss and the Switch-style load-balancing loss.

Load balancing (Switch Transformer, as the PESC paper states it): for each layer,

    f_i = share of (non-padding) tokens routed to expert i   (top-k hits / (N * k), sums to 1)
    P_i = mean router probability of expert i               (softmax over all E, float32)
    loss = E * sum_i f_i * P_i                               (1 when routing is uniform)

averaged over layers and multiplied by the coefficient (0.01).  ``f`` has no gradient; the
router learns through ``P``.  The authors' public code has a known bug that makes this loss
the constant E with zero gradient; :func:`load_balancing_loss` is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def answer_loss(logits_fn, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over answer tokens only, and their count.

    hidden: [B, S, H]; labels: [B, S] with IGNORE_INDEX outside answers.  Position t predicts
    token t+1, and logits are computed only where a label counts (the head is the biggest
    matmul and most tokens are prompt or padding).
    """
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    logits = logits_fn(hidden[:, :-1][keep])  # [N, V] float32
    return F.cross_entropy(logits, target[keep], reduction="sum"), n


@dataclass
class BalanceStats:
    """The aux loss (scaled by its coefficient) and the per-layer expert load f [L, E]."""

    loss: torch.Tensor
    load: torch.Tensor


def load_balancing_loss(
    router_logits: list[torch.Tensor],
    router_topk: list[torch.Tensor],
    token_mask: torch.Tensor,
    coef: float = 0.01,
) -> BalanceStats:
    """Switch load-balancing loss over the tokens where ``token_mask`` ([B, S] bool) is True.

    router_logits: per layer [B, S, E]; router_topk: per layer [B, S, k] expert ids.
    """
    if not router_logits:
        raise ValueError("load_balancing_loss needs at least one layer of router logits")
    losses, loads = [], []
    for logits, idx in zip(router_logits, router_topk):
        num_experts, k = logits.shape[-1], idx.shape[-1]
        lg = logits[token_mask].float()  # [N, E]
        n = lg.shape[0]
        if n == 0:
            raise ValueError("load_balancing_loss got a batch without any non-padding token")
        probs = torch.softmax(lg, dim=-1)
        p_mean = probs.mean(0)  # [E]
        hits = F.one_hot(idx[token_mask], num_experts).sum(1).float()  # [N, E], 0/1 per expert
        f = hits.sum(0) / (n * k)  # [E], sums to 1
        losses.append(num_experts * (f * p_mean).sum())
        loads.append(f.detach())
    return BalanceStats(coef * torch.stack(losses).mean(), torch.stack(loads))
