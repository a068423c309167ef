"""LoRA beside a (possibly quantized) linear layer: ``y = base(x) + scaling * (x A^T) B^T``.

Why not merge: a rank-4 update is smaller than one int4 quantization step, so merging it into
the base weights and re-quantizing rounds most of it away (the bundled camelidae lost half its
held-out arithmetic that way).  Kept apart, the base stays exactly its checkpoint, the
update runs in the activation dtype, and many deltas share one base: each layer holds every
resident delta's pair by slot and each token gets its own delta's (the C++ decode step runs
the same product, kernels/cpu_kernels.py hands it the pairs).

Our fused projections (q/k/v in ``qkv_proj``, gate/up in ``gate_up_proj``) get one LoRA made
of their parts: each checkpoint pair stays as it is (A ``[r, in]``, B ``[rows, r]``) and updates
its own projection's output rows of the fused layer.  Nothing is padded with zeros, so a
delta's LoRA takes the bytes of its file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pesc_serve.deltas.batch import DeltaBatch


@dataclass
class LoRAPart:
    """One checkpoint LoRA pair and the output rows of the (fused) layer it updates."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [rows, r]
    rows: slice


class LoRAWeights:
    """One delta's update on one (fused) linear layer: per part, A ``[r, in]`` and B transposed
    ``[r, rows]`` (what the row kernel reads) with the part's first output row, and the scaling
    (``alpha / r``, kept out of the weights so they stay the file's numbers).

    ``packed`` is the C++ kernel's handle on the same tensors (kernels/cpu_kernels.py makes it
    once; the PyTorch path and the decode step share it)."""

    def __init__(self, parts: list[LoRAPart], scaling: float, dtype: torch.dtype, device: torch.device) -> None:
        self.a = [p.a.to(device=device, dtype=dtype).contiguous() for p in parts]
        self.b_t = [p.b.t().to(device=device, dtype=dtype).contiguous() for p in parts]
        self.offsets = [p.rows.start or 0 for p in parts]
        self.scaling = float(scaling)
        self.packed: object | None = None

    @property
    def rank(self) -> int:
        return sum(a.shape[0] for a in self.a)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a, *self.b_t))

    def update(self, x: torch.Tensor, out_features: int) -> torch.Tensor:
        """``scaling * (x A^T) B^T`` as ``[*, out_features]`` by matmuls, in x's dtype (the
        reference the row kernel is checked against, and the path where it does not run)."""
        out = x.new_zeros(*x.shape[:-1], out_features)
        for a, b_t, offset in zip(self.a, self.b_t, self.offsets):
            u = (x @ a.to(x.dtype).t()) * self.scaling
            out[..., offset : offset + b_t.shape[1]] += u @ b_t.to(x.dtype)
        return out


class SlotLoRA(nn.Module):
    """The unmerged LoRA of every resident delta on one linear layer, by delta slot.

    Called with the layer's output and input: each token's row gets its own delta's update
    (``deltas`` says which); rows of deltas without one here, and of the base, pass unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_slot: dict[int, LoRAWeights] = {}
        # (y, x, LoRAWeights) -> None adding the update in place, row by row: the C++ kernel the
        # CPU decode step also runs (kernels/cpu_kernels.py installs it), so both paths agree and a
        # row's numbers never depend on the batch.  None: matmuls (e.g. on CUDA).
        self.kernel = None

    def forward(self, y: torch.Tensor, x: torch.Tensor, deltas: DeltaBatch | None = None) -> torch.Tensor:
        if not self.by_slot:
            return y
        for slot, rows in deltas.groups if deltas is not None else [(0, None)]:
            w = self.by_slot.get(slot)
            if w is None:
                continue
            if rows is None:
                y = self._add(y, x, w)
            else:  # the rows' outputs gathered, updated, put back: the same numbers as a batch of them alone
                y.index_copy_(0, rows, self._add(y.index_select(0, rows), x.index_select(0, rows), w))
        return y

    def _add(self, y: torch.Tensor, x: torch.Tensor, w: LoRAWeights) -> torch.Tensor:
        if self.kernel is not None and y.dtype == torch.float32 and x.dtype == torch.float32:
            shape = y.shape
            y = y.reshape(-1, shape[-1]).contiguous()
            self.kernel(y, x.reshape(-1, x.shape[-1]), w)
            return y.view(shape)
        return y + w.update(x, y.shape[-1]).to(y.dtype)
