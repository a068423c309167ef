"""Weight-only quantization of linear layers by module swap (the model file never knows).

* ``int8``: per-output-channel symmetric int8; ``torch._weight_int8pack_mm`` on CPU, a
  dequantize-then-GEMM fallback elsewhere.
* ``int4``: group-wise (32) asymmetric int4 via ``_weight_int4pack_mm_for_cpu`` (CPU only);
  a layer whose shape that kernel cannot take (in_features not a multiple of 32, out_features
  not a multiple of 16) gets int8 instead.
* ``nf4``: bitsandbytes ``Linear4bit`` with double quantization, as in the PESC/QLoRA recipe.

Routers and adapters are never quantized: they are tiny and carry the expert behaviour.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZE = 32
INT8_PACK_K = 16  # _weight_int8pack_mm is wrong or crashes unless in_features is a multiple of 16
INT4_PACK_ROWS = 16  # _convert_weight_to_int4pack_for_cpu packs output rows in blocks of 16


class _CastingLinear(nn.Module):
    """Runs its kernel in ``kernel_dtype`` whatever the activations' dtype.

    The CPU weight-only kernels are fast only with bf16 activations, while the rest of a
    CPU model runs best in float32 (tiny bf16 matmuls carry a large fixed cost there).
    """

    kernel_dtype: torch.dtype
    out_features: int

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self._run(x2 if x2.dtype == self.kernel_dtype else x2.to(self.kernel_dtype))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class Int8WeightOnlyLinear(_CastingLinear):
    """y = (x @ W_int8^T) * scale; weights read as one byte each (decode is bandwidth-bound)."""

    def __init__(self, linear: nn.Linear, kernel_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        self.out_features, self.in_features = w.shape
        self.kernel_dtype = kernel_dtype or linear.weight.dtype
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(self.kernel_dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type == "cpu" and self.in_features % INT8_PACK_K == 0:
            return torch._weight_int8pack_mm(x2, self.weight, self.scale)
        return F.linear(x2, self.weight.to(x2.dtype)) * self.scale


class Int4WeightOnlyLinear(_CastingLinear):
    """Group-wise asymmetric int4 weights packed for the CPU int4 GEMM kernel."""

    def __init__(self, linear: nn.Linear, kernel_dtype: torch.dtype | None = None, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.out_features, self.in_features = w.shape
        if self.in_features % group_size:
            raise ValueError(f"int4 quantization needs in_features divisible by {group_size}, got {self.in_features}")
        self.kernel_dtype = kernel_dtype or linear.weight.dtype
        groups = w.view(self.out_features, -1, group_size)
        w_min, w_max = groups.amin(-1), groups.amax(-1)
        scale = ((w_max - w_min) / 15).clamp(min=1e-6)
        q = torch.round((groups - w_min.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.int32)
        # The kernel computes (q - 8) * scale + zero, so zero = w_min + 8 * scale.
        zero = w_min + 8 * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(self.out_features, -1), 1))
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
        self.register_buffer("scales_zeros", scales_zeros.to(self.kernel_dtype))
        self.group_size = group_size
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)


class DenseLinear(_CastingLinear):
    """A plain GEMM with weights kept in ``kernel_dtype`` (bf16 halves a float32 model's bytes)."""

    def __init__(self, linear: nn.Linear, kernel_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.kernel_dtype = kernel_dtype
        self.register_buffer("weight", linear.weight.detach().to(kernel_dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.packed: object | None = None  # the weight in a kernel's own layout (see use_packed)
        self._packed_run: Callable[[torch.Tensor, object], torch.Tensor] | None = None

    def use_packed(self, packed: object, run: Callable[[torch.Tensor, object], torch.Tensor]) -> None:
        """Serve from ``packed`` with ``run(x, packed)`` (e.g. the CPU bf16 GEMM of
        models/cpu_decode.py); ``weight`` becomes the packed tensor, so no second copy stays."""
        self.packed, self._packed_run = packed, run
        self.weight = packed.data

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        if self._packed_run is not None:
            return self._packed_run(x2, self.packed)
        return F.linear(x2, self.weight)


def nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """bitsandbytes NF4 with double quantization; quantizes when moved to its device."""
    import bitsandbytes as bnb

    device = linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        compress_statistics=True,
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.detach().to("cpu", torch.float32).to(compute_dtype),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q.to(device)


class HybridLinear(nn.Module):
    """Quantized weights for small batches, dense weights for large ones.

    Decode batches are bandwidth-bound (fewer weight bytes win); large prefill batches are
    compute-bound, where the dense bf16 GEMM beats the weight-only kernels.
    """

    def __init__(self, dense: nn.Module, quantized: nn.Module, max_rows: int) -> None:
        super().__init__()
        self.small = quantized
        self.large = dense
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return self.small(x) if rows <= self.max_rows else self.large(x)


def int4_fits(linear: nn.Linear) -> bool:
    """Whether the CPU int4 kernel accepts this layer's shape."""
    return linear.in_features % INT4_GROUP_SIZE == 0 and linear.out_features % INT4_PACK_ROWS == 0


def quantize_linear(linear: nn.Linear, method: str, kernel_dtype: torch.dtype) -> nn.Module:
    """Return the quantized replacement for one ``nn.Linear`` (kernels run in ``kernel_dtype``)."""
    if method == "none":
        return linear
    if method == "int8":
        return Int8WeightOnlyLinear(linear, kernel_dtype)
    if method == "int4":
        if linear.weight.device.type != "cpu":
            raise ValueError("--quantization int4 is implemented for CPU only; use int8 or nf4 on GPU")
        if not int4_fits(linear):
            return Int8WeightOnlyLinear(linear, kernel_dtype)
        return Int4WeightOnlyLinear(linear, kernel_dtype)
    if method == "nf4":
        return nf4_linear(linear, kernel_dtype)
    raise ValueError(f"unknown quantization method {method!r}")


def quantize_modules(
    root: nn.Module,
    names: tuple[str, ...],
    method: str,
    kernel_dtype: torch.dtype,
    hybrid_max_rows: int | None = None,
) -> int:
    """Swap every ``nn.Linear`` child called one of ``names`` below ``root``; returns the count.

    With ``hybrid_max_rows`` a dense copy (in ``kernel_dtype``) serves batches above that
    many rows.
    """
    if method == "none":
        return 0
    swapped = 0
    for module in list(root.modules()):
        for name in names:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                q = quantize_linear(child, method, kernel_dtype)
                if hybrid_max_rows is not None:
                    q = HybridLinear(DenseLinear(child, kernel_dtype), q, hybrid_max_rows)
                setattr(module, name, q)
                swapped += 1
    return swapped
