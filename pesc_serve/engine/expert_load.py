"""The router-load metric: cumulative tokens routed to each (layer, expert) of each served model.

A step reports its expert choices as (local ids [L, T, k], -1 where a token has fewer; delta
slot of each row, a list [T]); the slot says whose experts the ids are, at the time of the step.
"""

from __future__ import annotations

from typing import Callable

import torch


class ExpertLoad:
    """Counts per served model name: ``counts[name]`` is ``[L, E]`` of that model's delta.

    ``models()`` lists the served models with experts as (name, number of experts): each gets
    zero counts from the start, so a scrape before any traffic already shows its experts.
    Each model's counts live in a flat buffer with one extra bin that takes the -1 padding, so
    a step costs one ``bincount`` and one add per model in it, with no masking.
    """

    def __init__(self, num_layers: int, models: Callable[[], list[tuple[str, int]]]) -> None:
        self.num_layers = num_layers
        self.models = models
        self._bins: dict[str, torch.Tensor] = {}  # name -> [L * E + 1]

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        return {name: self._view(bins) for name, bins in list(self._bins.items())}

    def _view(self, bins: torch.Tensor) -> torch.Tensor:
        return bins[:-1].view(self.num_layers, -1)

    def _buffer(self, name: str, num_experts: int) -> torch.Tensor:
        bins = self._bins.get(name)
        if bins is None or bins.numel() != self.num_layers * num_experts + 1:  # new, or re-registered
            bins = self._bins[name] = torch.zeros(self.num_layers * num_experts + 1, dtype=torch.long)
        return bins

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Every served model's counts (zeros until its first token); safe from another thread."""
        for name, num_experts in self.models():
            if name not in self._bins:
                self._buffer(name, num_experts)
        return self.counts

    def record(self, parts: list[tuple[torch.Tensor, list[int]]],
               model_of: Callable[[int], tuple[str, int] | None]) -> None:
        """Add one step's choices; ``model_of(slot)`` is (model name, its number of experts)."""
        for choices, slots in parts:
            choices = choices.cpu()
            present = set(slots)
            for slot in present:
                owner = model_of(slot)
                if owner is None:
                    continue
                name, num_experts = owner
                ids = choices if len(present) == 1 else choices[:, torch.tensor(slots) == slot]
                bins = self._buffer(name, num_experts)
                offsets = (torch.arange(ids.shape[0]) * num_experts).view(-1, 1, 1)
                flat = torch.where(ids >= 0, ids + offsets, bins.numel() - 1).view(-1)
                bins += torch.bincount(flat, minlength=bins.numel())
