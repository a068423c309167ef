"""Which delta owns each token of a forward pass: the one place that says it.

Every row of a flat token batch carries the slot of its request's delta (slot 0 is the
``--model`` itself, whatever it is).  Layers ask :class:`DeltaBatch` for the rows of each
slot; a batch of one slot skips the gathers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DeltaBatch:
    """Delta slot per token row, and the rows of each slot present (``None``: every row)."""

    slots: torch.Tensor  # [T] int64, on the CPU (the C++ kernels read it)
    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)

    @classmethod
    def from_runs(cls, runs: list[tuple[int, int]], device: torch.device | str = "cpu") -> "DeltaBatch":
        """From consecutive (slot, number of rows) runs: a request's chunk is one run."""
        slots = torch.tensor([s for s, n in runs for _ in range(n)], dtype=torch.long)
        present = sorted({s for s, n in runs if n})
        if len(present) <= 1:
            return cls(slots, [(present[0], None)] if present else [])
        dev = torch.device(device)
        groups = [(s, torch.nonzero(slots == s).view(-1).to(dev)) for s in present]
        return cls(slots, groups)

    @classmethod
    def uniform(cls, slot: int, num_rows: int) -> "DeltaBatch":
        return cls.from_runs([(slot, num_rows)])

    @property
    def is_uniform(self) -> bool:
        return len(self.groups) <= 1

    def slot_set(self) -> set[int]:
        return {s for s, _ in self.groups}
