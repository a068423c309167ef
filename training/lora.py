"""LoRA around a frozen (possibly fused, possibly NF4) linear layer.

The serving model fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``.  LoRA
must stay per projection so the delta can be exported under Hugging Face names
(``q_proj.lora_A.weight`` ...) and merged by the loader, so one :class:`LoRALinear` holds
one low-rank pair per output slice of the fused weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha (update scaled by alpha / rank, as peft does) and input dropout."""

    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.1
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"--lora-rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {', '.join(unknown)}; choose from {', '.join(LORA_TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class Slice:
    """Rows ``[start, end)`` of a fused weight that belong to the projection ``name``."""

    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def lora_init_a(rank: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """peft's init for A: kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B starts at zero."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


class LoRALinear(nn.Module):
    """``y = base(x) + scaling * [B_s A_s dropout(x) for each slice s]`` (fp32 LoRA weights).

    ``slices`` must lie inside the base's output rows; rows of no slice get no update.
    """

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        slices: list[Slice],
        cfg: LoraConfig,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not slices:
            raise ValueError("LoRALinear needs at least one slice")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.slices = sorted(slices, key=lambda s: s.start)
        self.out_features = out_features
        self.rank, self.scaling = cfg.rank, cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout)
        self.lora_A = nn.ParameterDict(
            {s.name: nn.Parameter(lora_init_a(cfg.rank, in_features, generator)) for s in self.slices}
        )
        self.lora_B = nn.ParameterDict({s.name: nn.Parameter(torch.zeros(s.size, cfg.rank)) for s in self.slices})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a_cat = torch.cat([self.lora_A[s.name] for s in self.slices]).to(x.dtype)  # [n*r, in]
        z = F.linear(self.dropout(x), a_cat)  # [..., n*r]
        pieces, pos = [], 0
        for i, s in enumerate(self.slices):
            if s.start > pos:
                pieces.append(z.new_zeros(*z.shape[:-1], s.start - pos))
            zi = z[..., i * self.rank : (i + 1) * self.rank]
            pieces.append(F.linear(zi, self.lora_B[s.name].to(x.dtype)))
            pos = s.end
        if pos < self.out_features:
            pieces.append(z.new_zeros(*z.shape[:-1], self.out_features - pos))
        return y + self.scaling * torch.cat(pieces, dim=-1).to(y.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` of one slice, float32 [size, in]."""
        return self.scaling * (self.lora_B[name].float() @ self.lora_A[name].float())
