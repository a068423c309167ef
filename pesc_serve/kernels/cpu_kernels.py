"""The CPU kernels installed on a loaded model, and the one-call decode step (``csrc/``).

It also provides kernels that the PyTorch path uses on CPU: the expert-grouped adapter
kernel over every resident delta's experts (:class:`CpuKernels`), and int4/int8 (AVX512-VNNI) and bf16 GEMMs on
weights repacked once at start-up (:func:`install_packed_kernels`).

At decode batch sizes a PyTorch forward is mostly per-op dispatch cost, not arithmetic; the
extension runs a whole decode step in one call (see ``csrc/decode_model.h`` for why and how).  It
takes the weights of an already-loaded :class:`PescForCausalLM`, so loading, quantization
and the Python path stay the single source of truth, and it is only used where it applies:
CPU, float32 activations and KV cache, linears that are dense, int8 or int4 (optionally with
dense copies for large batches).  Anything else returns ``None`` and the runner keeps the
PyTorch path.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from pesc_serve.kernels.build import load_extension
from pesc_serve.layers.lora import LoRAWeights, SlotLoRA
from pesc_serve.layers.pesc_mlp import ExpertSet, PescMLP
from pesc_serve.layers.quant import DenseLinear, HybridLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from pesc_serve.models.decoder import Attention, PescForCausalLM

if TYPE_CHECKING:
    from pesc_serve.deltas.delta import Delta

logger = logging.getLogger(__name__)

DENSE, INT8, INT4 = 0, 1, 2
LOW_BIT_ROWS, LOW_BIT_GROUP = 16, 32  # the VNNI kernels' row block and activation group
_EMPTY = torch.empty(0)


class UnsupportedModel(ValueError):
    """The loaded model uses something the C++ step does not implement."""


def _linear(ext: ModuleType, module: nn.Module, amx_from: int | None = None) -> object:
    """Describe one (possibly quantized) linear layer to the extension (LoRA pairs come later,
    per delta slot: :meth:`CpuKernels.set_lora`); int4 layers serve batches of ``amx_from``
    rows and more on AMX tiles (None: never), and so do int8 ones."""
    max_rows, dense, packed = -1, _EMPTY, None
    if isinstance(module, HybridLinear):
        if not isinstance(module.large, DenseLinear):
            raise UnsupportedModel(f"hybrid layer with a {type(module.large).__name__} dense part")
        max_rows, dense, packed = module.max_rows, module.large.weight, module.large.packed
        module = module.small
    bias = module.bias.detach().float().contiguous() if getattr(module, "bias", None) is not None else _EMPTY
    if isinstance(module, Int8WeightOnlyLinear):
        low_bit = module.packed if isinstance(module.packed, ext.PackedInt8) else None
        if low_bit is None and module.group_wise:  # Q8_0 blocks without the VNNI kernel: a dense copy
            weight = module.dequantize().to(module.kernel_dtype)
            return ext.Linear(DENSE, weight, _EMPTY, 0, -1, _EMPTY, bias, module.out_features, None, None)
        lin = ext.Linear(INT8, module.weight, module.scale, 0, max_rows, dense, bias, module.out_features, packed,
                         low_bit)
        if low_bit is not None and amx_from is not None:
            lin.set_amx_from(amx_from)
        return lin
    if isinstance(module, Int4WeightOnlyLinear):
        if isinstance(module.packed, ext.PackedInt4):
            lin = ext.Linear(INT4, module.qweight, _EMPTY, module.group_size, max_rows, dense, bias,
                             module.out_features, packed, module.packed)
            if amx_from is not None:
                lin.set_amx_from(amx_from)
            return lin
        aten = module.aten_packing()
        return ext.Linear(INT4, aten.data, aten.scales_zeros, module.group_size, max_rows, dense,
                          bias, module.out_features, packed, None)
    if isinstance(module, DenseLinear):
        if module.packed is not None:
            raise UnsupportedModel("a packed dense layer outside a hybrid one")
        return ext.Linear(DENSE, module.weight, _EMPTY, 0, max_rows, dense, bias, module.out_features, packed, None)
    if type(module) is nn.Linear:
        return ext.Linear(DENSE, module.weight.detach(), _EMPTY, 0, -1, _EMPTY, bias, module.out_features, None, None)
    raise UnsupportedModel(f"{type(module).__name__} linears are not supported by the CPU decode kernels")


def _low_bit_packing(ext: ModuleType, module: nn.Module) -> tuple[object, object] | None:
    """(packed weight, kernel) for an int4/int8 CPU layer the VNNI kernels can take, else None."""
    if module.packed is not None or getattr(module, module.weight_buffer).device.type != "cpu":
        return None
    if module.out_features % LOW_BIT_ROWS or module.in_features % LOW_BIT_GROUP:
        return None
    if isinstance(module, Int4WeightOnlyLinear) and module.group_size == LOW_BIT_GROUP:
        return ext.PackedInt4(module.qweight, module.scale_min), ext.int4_linear
    if isinstance(module, Int8WeightOnlyLinear):
        return ext.PackedInt8(module.weight, module.scale), ext.int8_linear
    return None


def install_packed_kernels(model: nn.Module, ext: ModuleType, amx_from: int | None = None) -> int:
    """Repack CPU weights for the extension's kernels, in place of their plain layout (one
    copy serves both the PyTorch path and the decode step): int4 and int8 layers for the
    VNNI kernels (batches of ``amx_from`` rows and more on AMX tiles, where the host's plan
    says so; the caller checks that Linux granted them: the int4 kernel's crossover also serves the int8 layers,
    whose tile work per row is the same), bf16 dense copies for the bf16 GEMM.  Unmerged LoRA updates get the same
    row-by-row kernel as the decode step, and attention the blocked prefill kernel (neither
    counted; they serve float32 CPU rows only).  Returns the count."""
    count = 0
    vnni, bf16 = ext.have_vnni(), ext.have_bf16_gemm()
    for module in model.modules():
        if vnni and isinstance(module, (Int4WeightOnlyLinear, Int8WeightOnlyLinear)):
            found = _low_bit_packing(ext, module)
            if found is not None:
                if amx_from is not None:
                    tiles = ext.int4_linear_amx if found[1] is ext.int4_linear else ext.int8_linear_amx
                    found = found[0], RowsSwitch(found[1], tiles, amx_from)
                module.use_packed(*found)
                count += 1
        if isinstance(module, SlotLoRA):
            module.kernel = _LoRAKernel(ext)
        if isinstance(module, Attention):
            module.prefill_kernel = ext.prefill_attention
        if bf16 and isinstance(module, HybridLinear) and isinstance(module.large, DenseLinear) \
                and module.dense_kernel == "packed-bf16":  # else oneDNN (at::linear) runs the dense copy
            dense = module.large
            if dense.packed is None and dense.weight.dtype == torch.bfloat16 and dense.weight.device.type == "cpu":
                dense.use_packed(ext.PackedBf16(dense.weight), ext.bf16_linear)
                count += 1
    return count


class RowsSwitch:
    """``(x, packed) -> y``: ``small`` for batches of fewer than ``rows`` rows, ``large`` for the rest."""

    def __init__(self, small: object, large: object, rows: int) -> None:
        self.small, self.large, self.rows = small, large, rows

    def __call__(self, x: torch.Tensor, packed: object) -> torch.Tensor:
        return (self.large if x.shape[0] >= self.rows else self.small)(x, packed)


class _LoRAKernel:
    """``(y, x, LoRAWeights) -> None``: the row-by-row LoRA kernel on a layer's rows (the C++
    handle on the weights is made once and shared with the decode step)."""

    def __init__(self, ext: ModuleType) -> None:
        self.ext = ext

    def __call__(self, y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights) -> None:
        self.ext.lora_add(y, x, lora_handle(self.ext, weights))


def lora_handle(ext: ModuleType, weights: LoRAWeights) -> object:
    """The C++ ``LoRA`` over ``weights``' own tensors (float32 or bf16, shared, not copied)."""
    if weights.packed is None:
        if any(a.dtype not in (torch.float32, torch.bfloat16) for a in weights.a):
            raise UnsupportedModel(f"the CPU LoRA kernel reads float32 or bf16 pairs, not {weights.a[0].dtype}")
        weights.packed = ext.LoRA(weights.a, weights.b_t, weights.offsets, weights.scaling)
    return weights.packed


class GroupedAdapters:
    """``(x, f, slots, k) -> (f + routed adapters, local top-k ids)`` on the C++ expert-grouped
    bf16 kernel, over one layer's :class:`AdapterStack` of packed deltas.

    Installed on a :class:`PescMLP` as ``grouped_adapters``; the decode step reads the same stack.
    """

    def __init__(self, ext: ModuleType, stack: object) -> None:
        self._run = ext.routed_adapters
        self.stack = stack

    def __call__(self, x: torch.Tensor, f: torch.Tensor, slots: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        y, ids = self._run(x, f, slots, self.stack, k)  # pybind returns a list
        return y, ids


def grouped_adapters_fit(mlp: PescMLP, stored_dtype: torch.dtype | None) -> bool:
    """bf16 adapter maths loses nothing that matters when a delta's adapters are stored in bf16
    or the shared FFN they sit on is quantized; float32 deltas over a float32 FFN keep the
    exact path."""
    return type(mlp.ffn.gate_up_proj) is not nn.Linear or stored_dtype == torch.bfloat16


_LINEAR_INDEX = {"qkv_proj": 0, "o_proj": 1, "gate_up_proj": 2, "down_proj": 3}  # DecodeModel.set_lora's


class CpuKernels:
    """The extension's per-model state: the decode step (None where the model does not fit it)
    and each layer's stack of packed deltas.  deltas/table.py installs and removes deltas here
    and in the PyTorch modules alike."""

    def __init__(self, ext: ModuleType, model: PescForCausalLM, decode_model: object | None,
                 grouped: bool = True) -> None:
        self.ext = ext
        self.model = model
        self.decode_model = decode_model
        self.stacks: list[object] | None = None  # None: every delta's experts take the float32 path
        if grouped and ext.have_bf16_gemm():
            self.stacks = []
            for i, layer in enumerate(model.layers):
                stack = ext.AdapterStack()
                layer.mlp.grouped_adapters = GroupedAdapters(ext, stack)
                self.stacks.append(stack)
                if decode_model is not None:
                    decode_model.use_adapter_stack(i, stack)

    def _packs(self, layer: int, stored_dtype: torch.dtype | None) -> bool:
        mlp = self.model.layers[layer].mlp
        return self.stacks is not None and mlp.dispatch == "auto" and grouped_adapters_fit(mlp, stored_dtype)

    def pack(self, delta: "Delta") -> None:
        """Pack a delta's experts for the grouped kernel ahead of installing it, so the costly
        part of a load runs on the loader thread, not between two engine steps."""
        for layer, experts in enumerate(delta.experts or []):
            if self._packs(layer, delta.stored_dtype):
                self._pack(experts)

    def _pack(self, experts: ExpertSet) -> object:
        """The packed copy, made once; it becomes the only one (a second engine reuses it)."""
        if experts.packed is None:
            experts.keep_only_packed(self.ext.PackedAdapters(experts.router, experts.down, experts.up, experts.topk))
        return experts.packed

    def set_experts(self, layer: int, slot: int, experts: ExpertSet | None, stored_dtype: torch.dtype | None) -> None:
        """Put (or, with None, remove) one delta's experts of one layer in ``slot``."""
        mlp = self.model.layers[layer].mlp
        dm = self.decode_model
        mlp.packed_slots.discard(slot)
        if self.stacks is not None:
            self.stacks[layer].clear(slot)
        if dm is not None:
            dm.set_experts(layer, slot, _EMPTY, _EMPTY, _EMPTY, 0)
        if experts is None:
            return
        if self._packs(layer, stored_dtype):
            self.stacks[layer].set(slot, self._pack(experts))
            mlp.packed_slots.add(slot)
            if dm is not None:
                dm.reserve_topk(experts.topk)
        elif dm is not None:
            dm.set_experts(layer, slot, _f32(experts.router), _f32(experts.down), _f32(experts.up_t), experts.topk)

    def set_lora(self, module_name: str, slot: int, weights: LoRAWeights | None) -> None:
        """Give the decode step one delta's LoRA pair on ``module_name`` (None: remove it)."""
        if self.decode_model is None:
            return
        parts = module_name.split(".")  # layers.{l}.<attn or mlp...>.<leaf>
        layer, which = int(parts[1]), _LINEAR_INDEX[parts[-1]]
        self.decode_model.set_lora(layer, which, slot, None if weights is None else lora_handle(self.ext, weights))


def _f32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise UnsupportedModel("the CPU decode kernels need float32 activations (--dtype float32 or auto)")
    return t.detach().contiguous()


def build_decode_model(model: PescForCausalLM, ext: ModuleType, amx_from: int | None = None) -> object:
    """An ``ext.DecodeModel`` sharing ``model``'s base weights; raises UnsupportedModel.
    ``amx_from``: as for :func:`install_packed_kernels` (big decode batches)."""
    cfg = model.config
    if model.embed_tokens.weight.device.type != "cpu":
        raise UnsupportedModel("not a CPU model")
    head = model.lm_head
    dm = ext.DecodeModel(
        cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
        float(cfg.rms_norm_eps), cfg.sliding_window or -1,
        _f32(model.embed_tokens.weight), _f32(model.norm.weight),
        _linear(ext, head, amx_from) if head is not None else ext.Linear(DENSE, _EMPTY, _EMPTY, 0, -1, _EMPTY, _EMPTY, 0, None, None),
        head is None, _f32(model.rotary.cos_sin),
    )
    for layer in model.layers:
        ffn = layer.mlp.ffn
        dm.add_layer(ext.Layer(
            _f32(layer.input_layernorm.weight), _f32(layer.post_attention_layernorm.weight),
            _linear(ext, layer.self_attn.qkv_proj, amx_from), _linear(ext, layer.self_attn.o_proj, amx_from),
            _linear(ext, ffn.gate_up_proj, amx_from), _linear(ext, ffn.down_proj, amx_from),
        ))
    return dm


def try_build(model: PescForCausalLM, policy: str, kv_dtype: torch.dtype = torch.float32,
              amx_from: int | None = None) -> CpuKernels | None:
    """The CPU kernels for ``--cpu-kernels auto|on``; None when off or not applicable
    (``amx_from``: the host plan's AMX crossover for int4 layers, QuantPlan.amx_from_rows).  Their
    ``decode_model`` is None where only the decode step does not fit (the PyTorch path still
    gets the packed GEMMs and the grouped adapters)."""
    if policy == "off" or os.environ.get("PESC_SERVE_CPU_KERNELS") == "off":
        return None
    try:
        if kv_dtype not in (torch.float32, torch.float16):
            raise UnsupportedModel(f"the CPU decode kernels need a float32 or float16 KV cache, not {kv_dtype}")
        ext = load_extension()
    except UnsupportedModel as exc:
        if policy == "on":
            raise ValueError(f"--cpu-kernels on: {exc}") from None
        logger.info("CPU decode kernels not used: %s", exc)
        return None
    except Exception as exc:  # no compiler, build failure: keep serving on the PyTorch path
        if policy == "on":
            raise ValueError(f"--cpu-kernels on: could not build the extension ({exc})") from None
        logger.warning("CPU decode kernels unavailable (%s); using the PyTorch path", exc)
        return None
    if amx_from is not None and not ext.amx_ready():  # a plan cached where the tiles were granted
        amx_from = None
    install_packed_kernels(model, ext, amx_from)
    try:
        dm = build_decode_model(model, ext, amx_from)
    except UnsupportedModel as exc:
        if policy == "on":
            raise ValueError(f"--cpu-kernels on: {exc}") from None
        logger.info("CPU decode step not used: %s", exc)
        dm = None
    return CpuKernels(ext, model, dm)
