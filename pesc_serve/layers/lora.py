"""LoRA beside a (possibly quantized) linear layer: ``y = base(x) + (x A^T) B^T``.

Why not merge: a rank-4 update is smaller than one int4 quantization step, so merging it into
the base weights and re-quantizing rounds most of it away (the bundled camelidae lost half its
held-out arithmetic that way).  Kept apart, the base stays exactly its checkpoint, the
update runs in the activation dtype, and many deltas share one base: each layer holds every
resident delta's pair by slot and each token gets its own delta's (the C++ decode step runs
the same product, kernels/cpu_kernels.py hands it the pairs).

Our fused projections (q/k/v in ``qkv_proj``, gate/up in ``gate_up_proj``) get one LoRA over
all their parts: the parts' A matrices stacked, their B matrices placed block-diagonally at
the parts' output rows, so one pair of small matmuls serves the fused layer.
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


def fuse_parts(parts: list[LoRAPart], out_features: int, scaling: float, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [sum r, in], B [out, sum r]) with ``scaling`` folded into B."""
    a = torch.cat([p.a.float() for p in parts]).to(device=device, dtype=dtype).contiguous()
    b = torch.zeros(out_features, a.shape[0], dtype=torch.float32)
    col = 0
    for p in parts:
        r = p.a.shape[0]
        b[p.rows, col : col + r] = p.b.float() * scaling
        col += r
    return a, b.to(device=device, dtype=dtype).contiguous()


class LoRAWeights:
    """One delta's update on one (fused) linear layer: A ``[r, in]``, B ``[out, r]`` (scaling in).

    Held once, as A and B transposed (``b_t [r, out]``, what the row kernel and the C++ step
    read; the step shares these tensors)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a = a.contiguous()
        self.b_t = b.t().contiguous()
        self.columns: torch.Tensor | None = None  # the row kernel's [r, 2] nonzero column ranges of b_t

    @property
    def b(self) -> torch.Tensor:
        return self.b_t.t()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b_t))


class SlotLoRA(nn.Module):
    """The unmerged LoRA of every resident delta on one linear layer, by delta slot.

    Called with the layer's output and input: each token's row gets its own delta's update
    (``deltas`` says which); rows of deltas without one here, and of the base, pass unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_slot: dict[int, LoRAWeights] = {}
        # (y, x, A, B^T, columns) -> None adding the update in place, row by row: the C++ kernel
        # the CPU decode step also runs (kernels/cpu_kernels.py installs it, and ``columns_of``,
        # each rank's nonzero columns: a fused layer's B is block-diagonal), so both paths agree
        # and a row's numbers never depend on the batch.  None: matmuls (e.g. on CUDA).
        self.kernel = None
        self.columns_of = None

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
        if self.kernel is not None and y.dtype == torch.float32 and x.dtype == torch.float32 and w.a.dtype == torch.float32:
            if w.columns is None:
                w.columns = self.columns_of(w.b_t)
            shape = y.shape
            y = y.reshape(-1, shape[-1]).contiguous()
            self.kernel(y, x.reshape(-1, x.shape[-1]), w.a, w.b_t, w.columns)
            return y.view(shape)
        return y + ((x.to(w.a.dtype) @ w.a.t()) @ w.b_t).to(y.dtype)
