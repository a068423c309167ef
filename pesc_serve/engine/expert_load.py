"""The router-load metric: cumulative tokens routed to each (layer, expert) of each served model.

A step reports its expert choices as (local ids [L, T, k], -1 where a token has fewer; delta
slot of each row, a list [T]); the slot says whose experts the ids are, at the time of the step.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

FOLD_EVERY = 64  # steps whose choices wait before one bincount adds them up


class ExpertLoad:
    """Counts per served model name: ``counts[name]`` is ``[L, E]`` of that model's delta.

    ``models()`` lists the served models with experts as (name, number of experts): each gets
    zero counts from the start, so a scrape before any traffic already shows its experts.
    A step only files its choices under their model (a few microseconds on the engine
    thread); every ``FOLD_EVERY`` steps, or when someone reads the counts, the filed choices
    are concatenated and counted by one ``bincount`` per model into a flat buffer whose
    extra bin takes the -1 padding.  Counting per step cost about 0.25 ms of a 7 ms decode
    step.  A lock keeps a scrape from another thread consistent with the engine's filing.
    """

    def __init__(self, num_layers: int, models: Callable[[], list[tuple[str, int]]]) -> None:
        self.num_layers = num_layers
        self.models = models
        self._bins: dict[str, torch.Tensor] = {}  # name -> [L * E + 1]
        self._pending: dict[tuple[str, int], list[torch.Tensor]] = {}  # (name, E) -> ids [L, T_i, k] each
        self._pending_steps = 0
        self._lock = threading.Lock()

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        with self._lock:
            self._fold()
            return {name: bins[:-1].view(self.num_layers, -1).clone() for name, bins in self._bins.items()}

    def _buffer(self, name: str, num_experts: int) -> torch.Tensor:
        bins = self._bins.get(name)
        if bins is None or bins.numel() != self.num_layers * num_experts + 1:  # new, or re-registered
            bins = self._bins[name] = torch.zeros(self.num_layers * num_experts + 1, dtype=torch.long)
        return bins

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Every served model's counts (zeros until its first token); safe from another thread."""
        models = self.models()
        with self._lock:
            for name, num_experts in models:
                if name not in self._bins:
                    self._buffer(name, num_experts)
        return self.counts

    def record(self, parts: list[tuple[torch.Tensor, list[int]]],
               model_of: Callable[[int], tuple[str, int] | None]) -> None:
        """File one step's choices; ``model_of(slot)`` is (model name, its number of experts)."""
        with self._lock:
            for choices, slots in parts:
                present = set(slots)
                for slot in present:
                    owner = model_of(slot)
                    if owner is None:
                        continue
                    ids = choices if len(present) == 1 else choices[:, torch.tensor(slots) == slot]
                    self._pending.setdefault(owner, []).append(ids.cpu())
            self._pending_steps += 1
            if self._pending_steps >= FOLD_EVERY:
                self._fold()

    def _fold(self) -> None:
        """Count the filed choices into the buffers (the caller holds the lock)."""
        for (name, num_experts), filed in self._pending.items():
            k = max(ids.shape[2] for ids in filed)
            ids = torch.cat([torch.nn.functional.pad(t, (0, k - t.shape[2]), value=-1) for t in filed], dim=1)
            bins = self._buffer(name, num_experts)
            offsets = (torch.arange(ids.shape[0]) * num_experts).view(-1, 1, 1)
            flat = torch.where(ids >= 0, ids + offsets, bins.numel() - 1).view(-1)
            bins += torch.bincount(flat, minlength=bins.numel())
        self._pending.clear()
        self._pending_steps = 0
