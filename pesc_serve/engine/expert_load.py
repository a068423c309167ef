"""The router-load metric: cumulative tokens routed to each (layer, expert) of each served model.

A step reports its expert choices as (local ids [L, T, k], -1 where a token has fewer; delta
slot of each row [T]); the slot says whose experts the ids are, at the time of the step.
"""

from __future__ import annotations

from typing import Callable

import torch


class ExpertLoad:
    """Counts per served model name: ``counts[name]`` is ``[L, E]`` of that model's delta.

    ``models()`` lists the served models with experts as (name, number of experts): each gets
    zero counts from the start, so a scrape before any traffic already shows its experts.
    """

    def __init__(self, num_layers: int, models: Callable[[], list[tuple[str, int]]]) -> None:
        self.num_layers = num_layers
        self.models = models
        self.counts: dict[str, torch.Tensor] = {}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Every served model's counts (zeros until its first token); safe from another thread."""
        for name, num_experts in self.models():
            if name not in self.counts:
                self.counts[name] = torch.zeros(self.num_layers, num_experts, dtype=torch.long)
        return dict(list(self.counts.items()))

    def record(self, parts: list[tuple[torch.Tensor, torch.Tensor]],
               model_of: Callable[[int], tuple[str, int] | None]) -> None:
        """Add one step's choices; ``model_of(slot)`` is (model name, its number of experts)."""
        for choices, slots in parts:
            choices = choices.cpu()
            for slot in torch.unique(slots).tolist():
                owner = model_of(slot)
                if owner is None:
                    continue
                name, num_experts = owner
                ids = choices[:, slots == slot]  # [L, T_s, k]
                layers = ids.shape[0]
                counts = self.counts.get(name)
                if counts is None or counts.shape[1] != num_experts:  # new, or re-registered with other experts
                    counts = self.counts[name] = torch.zeros(layers, num_experts, dtype=torch.long)
                valid = ids >= 0
                flat = (ids + torch.arange(layers).view(-1, 1, 1) * num_experts)[valid]
                counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
