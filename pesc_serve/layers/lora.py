"""LoRA beside a (possibly quantized) linear layer: ``y = base(x) + (x A^T) B^T``.

Why not merge: a rank-4 update is smaller than one int4 quantization step, so merging it into
the base weights and re-quantizing rounds most of it away (the bundled camelidae lost half its
held-out arithmetic that way).  Kept apart, the base stays exactly its checkpoint and the
update runs in the activation dtype; the C++ decode step runs the same product
(models/cpu_decode.py hands it ``lora_a``/``lora_b``).

Our fused projections (q/k/v in ``qkv_proj``, gate/up in ``gate_up_proj``) get one LoRA over
all their parts: the parts' A matrices stacked, their B matrices placed block-diagonally at
the parts' output rows, so one pair of small matmuls serves the fused layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


class LoRALinear(nn.Module):
    """A linear layer plus its unmerged low-rank update (one delta)."""

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        self.register_buffer("lora_b_t", lora_b.t().contiguous(), persistent=False)  # [r, N], the kernel's
        self.out_features = lora_b.shape[0]
        # (y, x, A, B^T) -> None adding the update in place, row by row: the C++ kernel the CPU
        # decode step also runs (models/cpu_decode.py installs it), so both paths agree and a
        # row's numbers never depend on the batch.  None: matmuls (e.g. on CUDA).
        self.kernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.kernel is not None and y.dtype == torch.float32 and x.dtype == torch.float32:
            shape = y.shape
            y2 = y.reshape(-1, shape[-1]).contiguous()
            self.kernel(y2, x.reshape(-1, x.shape[-1]), self.lora_a, self.lora_b_t)
            return y2.view(shape)
        update = (x.to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t()
        return y + update.to(y.dtype)


def merge_into(weight: torch.Tensor, part: LoRAPart, scaling: float) -> None:
    """W[rows] += scaling * B @ A in float32: exact only for an unquantized weight."""
    with torch.no_grad():
        view = weight[part.rows]
        view.copy_(view.float() + scaling * (part.b.float() @ part.a.float()).to(view.device))
