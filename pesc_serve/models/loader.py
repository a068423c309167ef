"""Checkpoint -> :class:`PescForCausalLM`: name mapping, fusion, expert stacking, checks.

Tensors stream from the files one at a time into preallocated parameters (no second copy
of the model in memory).  Hugging Face names map onto our fused layout: q/k/v into
``qkv_proj``, gate/up into ``gate_up_proj``, per-expert adapters into stacked ``[E, ...]``
tensors with ``moe_scaling`` folded into the up-projection (deltas/delta.py reads those).
The model holds the base's weights only: a full PESC checkpoint's own experts, or the delta
that ``--model`` names over its base, come back as a :class:`Delta` that the engine installs
in slot 0, beside the deltas of ``--adapters``.  LoRA pairs are never merged: the base
keeps the checkpoint's values and each delta's update runs beside it (layers/lora.py).
Missing, unexpected or mis-shaped tensors stop the load with a message naming the tensor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from pesc_serve.config import LoadConfig, ModelConfig, resolve_device, resolve_dtype
from pesc_serve.deltas.delta import (
    Delta,
    DeltaSource,
    ExpertCollector,
    LoRASite,
    canonical_name,
    find_delta,
    is_adapter_tensor,
    read_delta,
)
from pesc_serve.deltas.table import DeltaTable
from pesc_serve.layers.quant import (
    INT4_GROUP_SIZE,
    INT4_PACK_ROWS,
    DenseLinear,
    HybridLinear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    quantize_modules,
)
from pesc_serve.models.checkpoint_files import iter_tensors, weight_files
from pesc_serve.kernels.plan import ATEN_LOW_BIT_MAX_ROWS, KernelPlan, host_plan
from pesc_serve.models.decoder import PescForCausalLM
from pesc_serve.models.gguf_reader import GGUFCheckpoint, Q4Blocks, Q8Blocks
from pesc_serve.registry import ModelSource

logger = logging.getLogger(__name__)

_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq$)|(\.masked_bias$)|(\.attn\.bias$)")
LORA_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # the linears a delta's LoRA may target


@dataclass
class Target:
    """Where one checkpoint tensor lands: ``param[index]``."""

    param: torch.Tensor
    index: tuple
    shape: tuple[int, ...]

    def view(self) -> torch.Tensor:
        return self.param[self.index] if self.index else self.param


@dataclass
class LoadedModel:
    """A ready base model, the delta its name serves (slot 0; None: the bare base), and what the
    start-up log reports about it."""

    model: PescForCausalLM
    config: ModelConfig  # the base's geometry
    source: ModelSource
    dtype: torch.dtype
    device: torch.device
    quantization: QuantPlan
    num_params: int
    weight_bytes: int
    delta: Delta | None = None


@dataclass(frozen=True)
class Placement:
    """Where a Hugging Face tensor goes: ``rows`` of parameter ``param`` of module ``module``."""

    module: str
    param: str
    shape: tuple[int, ...]
    rows: slice | None = None


def placements(cfg: ModelConfig, tied_head: bool) -> dict[str, Placement]:
    """Every base tensor name the config implies, and where it lands: the one name map that the
    loader, the LoRA sites and the GGUF block check share."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.q_size, cfg.kv_size
    t = {
        "model.embed_tokens.weight": Placement("embed_tokens", "weight", (cfg.vocab_size, h)),
        "model.norm.weight": Placement("norm", "weight", (h,)),
    }
    if not tied_head:
        t["lm_head.weight"] = Placement("lm_head", "weight", (cfg.vocab_size, h))
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        t[p + "input_layernorm.weight"] = Placement(m + "input_layernorm", "weight", (h,))
        t[p + "post_attention_layernorm.weight"] = Placement(m + "post_attention_layernorm", "weight", (h,))
        for name, lo, hi in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
            t[p + f"self_attn.{name}.weight"] = Placement(m + "self_attn.qkv_proj", "weight", (hi - lo, h), slice(lo, hi))
            if cfg.attention_bias:
                t[p + f"self_attn.{name}.bias"] = Placement(m + "self_attn.qkv_proj", "bias", (hi - lo,), slice(lo, hi))
        t[p + "self_attn.o_proj.weight"] = Placement(m + "self_attn.o_proj", "weight", (h, q))
        t[p + "mlp.gate_proj.weight"] = Placement(m + "mlp.ffn.gate_up_proj", "weight", (inter, h), slice(0, inter))
        t[p + "mlp.up_proj.weight"] = Placement(m + "mlp.ffn.gate_up_proj", "weight", (inter, h), slice(inter, 2 * inter))
        t[p + "mlp.down_proj.weight"] = Placement(m + "mlp.ffn.down_proj", "weight", (h, inter))
    return t


def build_targets(model: PescForCausalLM, cfg: ModelConfig) -> dict[str, Target]:
    """Every base tensor name the config implies, mapped onto our parameters."""
    targets = {}
    for name, p in placements(cfg, model.lm_head is None).items():
        param = getattr(model.get_submodule(p.module), p.param)
        targets[name] = Target(param, (p.rows,) if p.rows is not None else (), p.shape)
    return targets


def lora_sites(cfg: ModelConfig) -> dict[str, LoRASite]:
    """The checkpoint weights a delta's LoRA may update, and the fused module rows they are."""
    return {name: LoRASite(p.module, p.rows or slice(0, p.shape[0]), p.shape)  # type: ignore[arg-type]
            for name, p in placements(cfg, True).items()
            if p.param == "weight" and p.module.rsplit(".", 1)[-1] in LORA_MODULES}


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Build modules without running their random initialisation: every parameter is loaded
    afterwards, and the first ``normal_`` on a meta tensor imports torch._dynamo (~1.4 s of
    start-up).  The same thing transformers' ``no_init_weights`` does."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace meta parameters with uninitialised real ones (every one is then loaded)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device), False)


class _Assigner:
    """Copies checkpoint tensors into their targets and remembers what it has seen.

    Q4_1 blocks aimed at a linear module the plan makes int4 are kept as they are (``blocks``,
    per module: the parts of a fused layer with their output rows); any other is dequantized.
    A full PESC checkpoint's routers and adapters go to ``experts`` (None: a dense config).
    """

    def __init__(self, targets: dict[str, Target], places: dict[str, Placement], tied: bool,
                 int4_modules: set[str], experts: ExpertCollector | None) -> None:
        self.targets = targets
        self.places = places
        self.tied = tied
        self.seen: set[str] = set()
        self.int4_modules = int4_modules
        self.blocks: dict[str, list[tuple[slice, Q4Blocks, str]]] = {}
        self.head_blocks: Q8Blocks | None = None  # Q8_0 blocks of the LM head's weight (tied or not)
        self.experts = experts

    def assign(self, raw_name: str, tensor: "torch.Tensor | Q4Blocks", origin: Path) -> None:
        name = canonical_name(raw_name)
        if _IGNORED.search(name) or (self.tied and name == "lm_head.weight"):
            return
        target = self.targets.get(name)
        if isinstance(tensor, Q4Blocks):
            place = self.places.get(name)
            module = place.module if place is not None and place.param == "weight" else None
            if module in self.int4_modules and tuple(tensor.shape) == target.shape and name not in self.seen:
                rows = place.rows or slice(0, place.shape[0])
                self.blocks.setdefault(module, []).append((rows, tensor, name))
                self.seen.add(name)
                return
            tensor = tensor.dequantize()
        if isinstance(tensor, Q8Blocks):
            head = "lm_head.weight" if "lm_head.weight" in self.targets else "model.embed_tokens.weight"
            if name == head:
                self.head_blocks = tensor
            tensor = tensor.dequantize()  # exact: the embedding lookup (and any other use) reads these
        if target is None and self.experts is not None and is_adapter_tensor(name):
            self.experts.add(raw_name, name, tensor, origin)
            return
        if target is None:
            raise ValueError(f"{origin}: unexpected tensor {raw_name!r} (not part of this model's config.json)")
        if tuple(tensor.shape) != target.shape:
            raise ValueError(
                f"{origin}: tensor {raw_name!r} has shape {list(tensor.shape)}, expected {list(target.shape)} "
                f"from config.json"
            )
        if name in self.seen:
            raise ValueError(f"{origin}: tensor {raw_name!r} appears twice")
        with torch.no_grad():
            target.view().copy_(tensor)
        self.seen.add(name)

    def check_complete(self, what: str) -> None:
        missing = sorted(set(self.targets) - self.seen) + (self.experts.missing() if self.experts else [])
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"{what}: checkpoint is missing tensor(s) {shown}")


def _source_tensors(source: ModelSource, q4_blocks: bool = False) -> Iterator[tuple[str, "torch.Tensor | Q4Blocks", Path]]:
    if source.kind == "gguf":
        for name, tensor in (source.gguf or GGUFCheckpoint(source.path)).tensors(q4_blocks=q4_blocks):
            yield name, tensor, source.path
        return
    for path in weight_files(source.path):
        for name, tensor in iter_tensors(path):
            yield name, tensor, path


# The linear modules each QuantPlan field covers (by their attribute name).
QUANT_GROUPS = {"ffn": ("gate_up_proj", "down_proj"), "attention": ("qkv_proj", "o_proj"), "lm_head": ("lm_head",)}


@dataclass(frozen=True)
class QuantPlan:
    """Which weights get which weight-only format; decided once, at load time."""

    ffn: str = "none"  # the shared dense FFN (what --quantization names)
    attention: str = "none"  # qkv and output projections
    lm_head: str = "none"
    hybrid_max_rows: int | None = None  # dense weights serve batches above this many rows
    dense_kernel: str = "packed-bf16"  # the GEMM on those dense weights (kernels/plan.py)
    amx_from_rows: int | None = None  # int4 batches of at least this many rows run on AMX tiles (kernels/plan.py)
    kernel_dtype: torch.dtype | None = None  # dtype the weight kernels run in (None: the model's)

    def method_for(self, module_name: str) -> str:
        """The format of the linear module called ``module_name`` (its last name part decides)."""
        leaf = module_name.rsplit(".", 1)[-1]
        for group, leaves in QUANT_GROUPS.items():
            if leaf in leaves:
                return getattr(self, group)
        return "none"

    def describe(self) -> str:
        if self.ffn == self.attention == self.lm_head == "none":
            return "none"
        parts = [f"shared FFN {self.ffn}", f"attention {self.attention}", f"lm_head {self.lm_head}"]
        if self.hybrid_max_rows is not None:
            parts.append(f"dense bf16 weights ({self.dense_kernel}) for batches > {self.hybrid_max_rows} rows")
        if self.amx_from_rows is not None:
            parts.append(f"int4 on AMX tiles for batches >= {self.amx_from_rows} rows")
        return ", ".join(parts)


def resolve_quantization(name: str, device: torch.device, dtype: torch.dtype, kernels: KernelPlan | None = None,
                         arrives_quantized: bool = True) -> QuantPlan:
    """The weights' formats.  ``auto`` keeps what the checkpoint is: weights that arrive
    quantized (a GGUF's Q4 blocks, ``arrives_quantized``) stay low-bit on CPU, where decode is
    bandwidth-bound; float checkpoints (Hugging Face bf16/fp32) keep their precision; GPUs keep
    the model's dtype.

    The CPU low-bit plan, which ``int4`` asks for on any checkpoint: group-wise int4 attention
    and FFN linears and a per-channel int8 LM head (tied to the embeddings in small models), as
    llama.cpp's Q4_1 files have them.  Which kernel serves which batch size is the host's
    ``kernels`` plan (kernels/plan.py; None: no C++ kernels, so ATen's low-bit kernels serve
    small batches and dense bf16 copies large ones).  The CPU kernels run in bf16 whatever the
    activations' dtype.  ``int8`` is per-channel int8 for the same linears; ``nf4``
    (bitsandbytes, the PESC/QLoRA recipe) quantizes the shared FFN only.
    """
    cpu = device.type == "cpu"
    rows, dense = (ATEN_LOW_BIT_MAX_ROWS, "packed-bf16") if kernels is None else (kernels.dense_above, kernels.dense_kernel)
    amx = kernels.amx_from if kernels is not None else None
    if name == "auto":
        if not (cpu and arrives_quantized):
            return QuantPlan()
        name = "int4"
    if name in ("int4", "int8") and cpu:
        head = "int8"  # a per-channel int8 head (or the file's Q8_0 blocks)
        return QuantPlan(ffn=name, attention=name, lm_head=head, hybrid_max_rows=rows, dense_kernel=dense,
                         amx_from_rows=amx if name == "int4" else None,
                         kernel_dtype=torch.bfloat16)
    return QuantPlan(ffn=name)


def cpu_kernel_plan(cfg: ModelConfig) -> KernelPlan:
    """This host's kernel plan for ``cfg``'s shapes (the extension is built here if it is not
    cached yet: the engine uses it next anyway).  Without the extension (no compiler, or
    PESC_SERVE_CPU_KERNELS=off) the plan is ATen's kernels."""
    ext = None
    if os.environ.get("PESC_SERVE_CPU_KERNELS") != "off":
        try:
            from pesc_serve.kernels.build import load_extension

            ext = load_extension()
        except Exception as exc:  # the engine reports it again when it builds the kernels
            logger.info("no CPU kernel plan timing (%s)", exc)
    plan = host_plan(ext, cfg.hidden_size, 2 * cfg.intermediate_size)
    logger.info("%s", plan.describe())
    return plan


def apply_quantization(model: PescForCausalLM, plan: QuantPlan, dtype: torch.dtype,
                       head_blocks: Q8Blocks | None = None) -> None:
    """Swap the linears for the plan's formats; an int8 LM head whose weight arrived as Q8_0
    blocks takes them as they are (group-wise int8, bit for bit the file's)."""
    rows = plan.hybrid_max_rows
    kernel_dtype = plan.kernel_dtype or dtype
    quantize_modules(model, QUANT_GROUPS["ffn"], plan.ffn, kernel_dtype, rows, plan.dense_kernel)
    quantize_modules(model, QUANT_GROUPS["attention"], plan.attention, kernel_dtype, rows, plan.dense_kernel)
    if plan.lm_head == "none":
        return
    if model.lm_head is None:  # tied: a head module sharing the embedding matrix
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False, device="meta")
        model.lm_head.weight = model.embed_tokens.weight
    fits = head_blocks is not None and model.config.vocab_size % 16 == 0 and model.config.hidden_size % 32 == 0
    if plan.lm_head == "int8" and fits and model.embed_tokens.weight.device.type == "cpu":
        model.lm_head = Int8WeightOnlyLinear.from_blocks(head_blocks.q, head_blocks.scale, kernel_dtype)
        return
    quantize_modules(model, ("lm_head",), plan.lm_head, kernel_dtype, rows, plan.dense_kernel)


def load_model(source: ModelSource, load: LoadConfig, max_positions: int | None = None) -> LoadedModel:
    """Build the base model for ``source`` and fill every parameter from its checkpoint(s); the
    delta ``source`` names (a PESC delta over its base, or a full checkpoint's own experts) comes
    back beside it."""
    base = source.base if source.kind == "delta" and source.base is not None else source
    cfg = ModelConfig.from_hf_config(base.config if source.kind == "delta" else source.config, source=str(base.path))
    device = resolve_device(load.device)
    dtype = resolve_dtype(load.dtype, device)
    with torch.device("meta"), _skip_init():
        model = PescForCausalLM(cfg, dispatch=load.dispatch, max_positions=max_positions)
    _materialize(model, dtype, device)
    model.rotary.build_tables(device)
    arrives_quantized = base.kind == "gguf" and base.gguf is not None and base.gguf.is_quantized
    quant = resolve_quantization(load.quantization, device, dtype, arrives_quantized=arrives_quantized)
    if quant.hybrid_max_rows is not None:  # low-bit weights on CPU: the host decides which kernels serve them
        quant = resolve_quantization(load.quantization, device, dtype, cpu_kernel_plan(cfg), arrives_quantized)
    int4_modules = {name for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and quant.method_for(name) == "int4" and device.type == "cpu"}
    own_experts = None
    if cfg.is_pesc:
        geometry = (cfg.num_experts, cfg.topk, cfg.adapter_dim, cfg.moe_scaling)
        own_experts = ExpertCollector(cfg, geometry, str(source.path), "this model's config.json")
    places = placements(cfg, model.lm_head is None)
    assigner = _Assigner(build_targets(model, cfg), places, cfg.tie_word_embeddings, int4_modules, own_experts)
    if load.load_format == "dummy":
        _fill_random(assigner, cfg)
    else:
        for name, tensor, origin in _source_tensors(base, q4_blocks=bool(int4_modules)):
            assigner.assign(name, tensor, origin)
    assigner.check_complete(str(base.path))
    _install_blocks(model, assigner, quant, dtype)
    apply_quantization(model, quant, dtype, assigner.head_blocks)
    model.eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    loaded = LoadedModel(model, cfg, source, dtype, device, quant, cfg.num_parameters, weight_bytes)
    if source.kind == "delta":  # its experts replace a PESC base's own
        loaded.delta = load_delta(loaded, find_delta(source.name, source.path))
    elif own_experts is not None:
        loaded.delta = Delta(source.name, str(source.path), experts=own_experts.build(dtype, device),
                             stored_dtype=own_experts.dtype)
    if loaded.delta is not None:  # ready to run offline; the engine adds it to its own table
        DeltaTable(model, None, 1).install(0, loaded.delta)
    return loaded


def load_delta(loaded: LoadedModel, source: DeltaSource) -> Delta:
    """Read ``source`` over ``loaded``'s base (checked against its geometry)."""
    return read_delta(source, loaded.config, loaded.source.name, lora_sites(loaded.config), loaded.dtype,
                      loaded.device)


def _install_blocks(model: nn.Module, assigner: _Assigner, plan: QuantPlan, dtype: torch.dtype) -> None:
    """Build the int4 layers whose weights arrived as Q4_1 blocks straight from them (bit for bit
    the file's weights, no float round trip).  A fused layer with a part that came in another
    format, or a shape the int4 kernel cannot take, gets its blocks dequantized instead and is
    quantized like any float weight."""
    kernel_dtype = plan.kernel_dtype or dtype
    for name, parts in assigner.blocks.items():
        linear = model.get_submodule(name)
        parts.sort(key=lambda p: p[0].start)
        covered = [p[0] for p in parts]
        whole = covered[0].start == 0 and covered[-1].stop == linear.out_features and all(
            a.stop == b.start for a, b in zip(covered, covered[1:]))
        fits = linear.out_features % INT4_PACK_ROWS == 0 and linear.in_features % INT4_GROUP_SIZE == 0
        if not (whole and fits):
            with torch.no_grad():
                for rows, blocks, _ in parts:
                    linear.weight[rows].copy_(blocks.dequantize())
            continue
        qweight = torch.cat([b.qweight for _, b, _ in parts])
        scale = torch.cat([b.scale for _, b, _ in parts])
        minimum = torch.cat([b.minimum for _, b, _ in parts])
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer: nn.Module = Int4WeightOnlyLinear.from_blocks(qweight, scale, minimum, kernel_dtype, bias)
        if plan.hybrid_max_rows is not None:  # CPUs without VNNI: dense copies for big batches
            shell = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
            with torch.no_grad():
                shell.weight.copy_(layer.dequantize())
                if linear.bias is not None:
                    shell.bias.copy_(linear.bias)
            layer = HybridLinear(DenseLinear(shell, kernel_dtype), layer, plan.hybrid_max_rows, plan.dense_kernel)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer)


def _fill_random(assigner: _Assigner, cfg: ModelConfig) -> None:
    """``--load-format dummy``: deterministic random weights of realistic scale, no files read.

    For benchmarking a checkpoint's shapes (e.g. Camelidae-8x7B) without its 14 GB of weights.
    """
    shapes = {name: t.shape for name, t in assigner.targets.items()}
    if assigner.experts is not None:
        shapes.update((name, assigner.experts.expected_shape(name)) for name in assigner.experts.expected_names())
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            value = torch.ones(shape)
        else:
            value = torch.randn(shape, generator=gen) * (shape[-1] ** -0.5)
        assigner.assign(name, value, Path("<dummy>"))
