"""Which delta owns each token of a forward pass: the one place that says it.

Every row of a flat token batch carries the slot of its request's delta (slot 0 is the
``--model`` itself, whatever it is).  Layers ask :class:`DeltaBatch` for the rows of each
slot; a batch of one slot skips the gathers.  The C++ decode step reads ``slots``, the
router-load metric ``owners``.
"""

from __future__ import annotations

from functools import cached_property

import torch


class DeltaBatch:
    """Delta slot per token row, and the rows of each slot present (``None``: every row)."""

    def __init__(self, owners: list[int], device: torch.device | str = "cpu") -> None:
        self.owners = owners  # slot of each row
        self.slots = torch.tensor(owners, dtype=torch.long)  # the same, on the CPU (the C++ kernels read it)
        self.device = torch.device(device)

    @classmethod
    def from_runs(cls, runs: list[tuple[int, int]], device: torch.device | str = "cpu") -> "DeltaBatch":
        """From consecutive (slot, number of rows) runs: a request's chunk is one run."""
        return cls([s for s, n in runs for _ in range(n)], device)

    @cached_property
    def groups(self) -> list[tuple[int, torch.Tensor | None]]:
        present = sorted(set(self.owners))
        if len(present) <= 1:
            return [(present[0], None)] if present else []
        return [(s, torch.nonzero(self.slots == s).view(-1).to(self.device)) for s in present]
