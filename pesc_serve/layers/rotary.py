"""Rotary position embeddings (rotate-half layout, as in Hugging Face Llama/Mistral/Qwen2)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with the linear and llama3 scalings applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv_freq / factor).float()
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate between.
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return scaled.float()


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position.

    The model looks the tables up once per forward (:meth:`lookup`) and every layer reuses
    them, so RoPE costs a few elementwise ops per layer and no indexing.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.register_buffer("cos_sin", torch.empty(max_positions, 2, head_dim), persistent=False)
        self._cast: dict[torch.dtype, torch.Tensor] = {}
        if self.cos_sin.device.type != "meta":
            self.build_tables(self.cos_sin.device)

    def build_tables(self, device: torch.device) -> None:
        """(Re)compute the float32 tables on ``device`` (models are built on the meta device)."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        t = torch.arange(self.max_positions, dtype=torch.float32)
        emb = torch.outer(t, inv_freq).repeat(1, 2)  # [P, D]: both halves share frequencies
        self.cos_sin = torch.stack([emb.cos(), emb.sin()], dim=1).to(device)  # [P, 2, D]
        self._cast = {}

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [T, 1, D] in ``dtype`` (HF casts the tables to the activations' dtype)."""
        table = self._cast.get(dtype)
        if table is None:
            table = self._cast[dtype] = self.cos_sin.to(dtype)
        cs = table[positions]  # [T, 2, D]
        return cs[:, 0:1], cs[:, 1:2]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] (q and k heads together) by per-token cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
