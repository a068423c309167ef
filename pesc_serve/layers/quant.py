"""Weight-only quantization of linear layers by module swap (the model file never knows).

* ``int8``: per-output-channel symmetric int8; ``torch._weight_int8pack_mm`` on CPU, a
  dequantize-then-GEMM fallback elsewhere.
* ``int4``: group-wise (32) asymmetric int4 (CPU only), on ATen's
  ``_weight_int4pack_mm_for_cpu``; a layer whose shape that kernel cannot take (in_features
  not a multiple of 32, out_features not a multiple of 16) gets int8 instead.
* ``nf4``: bitsandbytes ``Linear4bit`` with double quantization, as in the PESC/QLoRA recipe.

On CPUs with AVX512-VNNI, kernels/cpu_kernels.py repacks int8 and int4 layers for its own
kernels (:meth:`_CastingLinear.use_packed`), which multiply int8-quantized activations by
the integer weights and beat both ATen's low-bit kernels and bf16 at every batch size.

Routers and adapters are never quantized: they are tiny and carry the expert behaviour.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZE = 32
INT8_GROUP = 32  # inputs per scale of a group-wise (Q8_0) int8 weight
INT8_PACK_K = 16  # _weight_int8pack_mm is wrong or crashes unless in_features is a multiple of 16
INT4_PACK_ROWS = 16  # _convert_weight_to_int4pack_for_cpu packs output rows in blocks of 16


class _CastingLinear(nn.Module):
    """Runs its kernel in ``kernel_dtype`` whatever the activations' dtype.

    The CPU weight-only kernels are fast only with bf16 activations, while the rest of a
    CPU model runs best in float32 (tiny bf16 matmuls carry a large fixed cost there).

    A faster kernel can take over with :meth:`use_packed`: it gets the activations as they
    come and the weight in its own layout (the C++ kernels of kernels/cpu_kernels.py).
    """

    kernel_dtype: torch.dtype
    out_features: int
    weight_buffer: str = "weight"  # the buffer a packed kernel's layout replaces

    def __init__(self) -> None:
        super().__init__()
        self.packed: object | None = None
        self._packed_run: Callable[[torch.Tensor, object], torch.Tensor] | None = None

    def use_packed(self, packed: object, run: Callable[[torch.Tensor, object], torch.Tensor]) -> None:
        """Serve from ``packed`` with ``run(x, packed)``; the weight buffer becomes
        ``packed.data``, so no second copy of the weights stays."""
        self.packed, self._packed_run = packed, run
        setattr(self, self.weight_buffer, packed.data)

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._packed_run is not None:
            y = self._packed_run(x2, self.packed)
        else:
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

    @classmethod
    def from_blocks(cls, q: torch.Tensor, scale: torch.Tensor, kernel_dtype: torch.dtype,
                    bias: torch.Tensor | None = None) -> "Int8WeightOnlyLinear":
        """From Q8_0 blocks: q int8 [N, K], scale [N, K/32] float16 (one per 32 inputs), bit for
        bit the file's.  The C++ VNNI kernel serves them as they are; elsewhere a dense copy does."""
        module = cls.__new__(cls)
        _CastingLinear.__init__(module)
        module.out_features, module.in_features = q.shape
        module.kernel_dtype = kernel_dtype
        module.register_buffer("weight", q.contiguous())
        module.register_buffer("scale", scale.to(torch.float16).contiguous())  # [N, G]: group-wise
        module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        module._dense = None
        return module

    @property
    def group_wise(self) -> bool:
        return self.scale.dim() == 2

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] (only while ``weight`` is unpacked)."""
        w = self.weight.float()
        if not self.group_wise:
            return w * self.scale.float()[:, None]
        n, k = w.shape
        return (w.view(n, -1, INT8_GROUP) * self.scale.float().unsqueeze(-1)).view(n, k)

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        if self.group_wise:  # no ATen kernel takes group scales: a dense copy, made once
            if getattr(self, "_dense", None) is None:
                self._dense = self.dequantize().to(self.kernel_dtype)
            return F.linear(x2, self._dense)
        if x2.device.type == "cpu" and self.in_features % INT8_PACK_K == 0:
            return torch._weight_int8pack_mm(x2, self.weight, self.scale)
        return F.linear(x2, self.weight.to(x2.dtype)) * self.scale


class AtenInt4Packing:
    """An int4 weight in the layout of ATen's CPU kernel (``_weight_int4pack_mm_for_cpu``), with
    the scales in its convention and dtype."""

    def __init__(self, qweight: torch.Tensor, in_features: int, scales_zeros: torch.Tensor) -> None:
        q = torch.stack([qweight & 15, qweight >> 4], dim=-1).view(qweight.shape[0], in_features)
        self.data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.scales_zeros = scales_zeros


class Int4WeightOnlyLinear(_CastingLinear):
    """Group-wise asymmetric int4 weights: w = q * scale + min, q in 0..15, per 32 inputs.

    That is llama.cpp's Q4_1 block exactly, with ``scale`` and ``min`` in float16 as a GGUF file
    stores them, so a Q4_1 checkpoint loads bit for bit (:meth:`from_blocks`, no float round
    trip); float weights are quantized to the same form (min/max per group).  ``qweight`` holds
    two 4-bit values per byte (feature 2i in the low nibble) until a kernel repacks it: the C++
    kernel of kernels/cpu_kernels.py when installed, else ATen's CPU int4 kernel on first use
    (which wants bf16 scales in its own zero-point convention, derived then).
    """

    weight_buffer = "qweight"

    def __init__(self, linear: nn.Linear, kernel_dtype: torch.dtype | None = None, group_size: int = INT4_GROUP_SIZE) -> None:
        w = linear.weight.detach().float()
        out_features, in_features = w.shape
        if in_features % group_size:
            raise ValueError(f"int4 quantization needs in_features divisible by {group_size}, got {in_features}")
        groups = w.view(out_features, -1, group_size)
        w_min, w_max = groups.amin(-1), groups.amax(-1)
        scale = ((w_max - w_min) / 15).clamp(min=1e-6).half().float()  # as stored, so q fits it
        minimum = w_min.half().float()
        q = torch.round((groups - minimum.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
        q = q.view(out_features, -1)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self._setup(q[:, 0::2] | (q[:, 1::2] << 4), scale, minimum, kernel_dtype or linear.weight.dtype, bias, group_size)

    @classmethod
    def from_blocks(cls, qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, kernel_dtype: torch.dtype,
                    bias: torch.Tensor | None = None) -> "Int4WeightOnlyLinear":
        """From Q4_1-style blocks: qweight uint8 [N, K/2], scale and min [N, K/32] (float16 values)."""
        module = cls.__new__(cls)
        module._setup(qweight, scale.float(), minimum.float(), kernel_dtype, bias, INT4_GROUP_SIZE)
        return module

    def _setup(self, qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, kernel_dtype: torch.dtype,
               bias: torch.Tensor | None, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.kernel_dtype = kernel_dtype
        self.group_size = group_size
        self.register_buffer("qweight", qweight.contiguous())
        scale_min = torch.stack([scale, minimum], dim=-1).transpose(0, 1).to(torch.float16).contiguous()  # [G, N, 2]
        self.register_buffer("scale_min", scale_min)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] these blocks stand for (only while ``qweight`` is unpacked)."""
        q = torch.stack([self.qweight & 15, self.qweight >> 4], dim=-1).view(self.out_features, -1, self.group_size)
        scale, minimum = self.scale_min.float().transpose(0, 1).unbind(-1)  # [N, G] each
        return (q.float() * scale.unsqueeze(-1) + minimum.unsqueeze(-1)).view(self.out_features, self.in_features)

    def aten_scales_zeros(self) -> torch.Tensor:
        """ATen's [G, N, 2] (scale, zero) for w = (q - 8) * scale + zero, in the kernel dtype."""
        scale, minimum = self.scale_min.float().unbind(-1)
        return torch.stack([scale, minimum + 8 * scale], dim=-1).to(self.kernel_dtype).contiguous()

    def aten_packing(self) -> AtenInt4Packing:
        """Repack for ATen's kernel (once); fails if another kernel's layout already took over."""
        if self.packed is None:
            self.use_packed(AtenInt4Packing(self.qweight, self.in_features, self.aten_scales_zeros()), self._run_aten)
        if not isinstance(self.packed, AtenInt4Packing):
            raise RuntimeError(f"this int4 layer is packed for {type(self.packed).__name__}")
        return self.packed

    def _run_aten(self, x2: torch.Tensor, packed: AtenInt4Packing) -> torch.Tensor:
        x2 = x2 if x2.dtype == self.kernel_dtype else x2.to(self.kernel_dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed.data, self.group_size, packed.scales_zeros)

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        return self._run_aten(x2, self.aten_packing())


class DenseLinear(_CastingLinear):
    """A plain GEMM with weights kept in ``kernel_dtype`` (bf16 halves a float32 model's bytes)."""

    def __init__(self, linear: nn.Linear, kernel_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.kernel_dtype = kernel_dtype
        self.register_buffer("weight", linear.weight.detach().to(kernel_dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
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
    compute-bound, where a dense bf16 GEMM can beat the weight-only kernels.  ``dense_kernel``
    names the GEMM the CPU plan chose for the dense part (kernels/plan.py): our packed
    AVX512-BF16 kernel, or oneDNN's (AMX tiles where the CPU has them).
    """

    def __init__(self, dense: nn.Module, quantized: nn.Module, max_rows: int, dense_kernel: str = "packed-bf16") -> None:
        super().__init__()
        self.small = quantized
        self.large = dense
        self.max_rows = max_rows
        self.dense_kernel = dense_kernel

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
    dense_kernel: str = "packed-bf16",
) -> int:
    """Swap every ``nn.Linear`` child called one of ``names`` below ``root``; returns the count.

    With ``hybrid_max_rows`` a dense copy (in ``kernel_dtype``, run by ``dense_kernel``) serves
    batches above that many rows.
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
                    q = HybridLinear(DenseLinear(child, kernel_dtype), q, hybrid_max_rows, dense_kernel)
                setattr(module, name, q)
                swapped += 1
    return swapped
