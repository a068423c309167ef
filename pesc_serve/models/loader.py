"""Checkpoint -> :class:`PescForCausalLM`: name mapping, fusion, expert stacking, checks.

Tensors stream from the files one at a time into preallocated parameters (no second copy
of the model in memory).  Hugging Face names map onto our fused layout: q/k/v into
``qkv_proj``, gate/up into ``gate_up_proj``, per-expert adapters into stacked ``[E, ...]``
tensors with ``moe_scaling`` folded into the up-projection.  Both expert spellings
(``experts.expert_{e}.`` Camelidae/Qwen2idae, ``experts.{e}.`` Sparsetral) are accepted.
A PESC delta (routers, adapters, optional LoRA) is applied on top of its base.  Its LoRA is
merged only into weights that stay unquantized (exact, and free at run time); a weight that
is quantized keeps the checkpoint's values and runs the LoRA beside it, unmerged
(layers/lora.py), since re-quantizing a merged weight would round the update away.
Missing, unexpected or mis-shaped tensors stop the load with a message naming the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from pesc_serve.config import LoadConfig, ModelConfig, resolve_device, resolve_dtype
from pesc_serve.layers.lora import LoRALinear, LoRAPart, fuse_parts, merge_into
from pesc_serve.layers.quant import (
    INT4_GROUP_SIZE,
    INT4_PACK_ROWS,
    DenseLinear,
    HybridLinear,
    Int4WeightOnlyLinear,
    quantize_modules,
)
from pesc_serve.models.checkpoint_files import iter_tensors, weight_files
from pesc_serve.models.cpu_decode import cpu_has_vnni
from pesc_serve.models.decoder import PescForCausalLM
from pesc_serve.models.gguf_reader import GGUFCheckpoint, Q4Blocks
from pesc_serve.registry import ModelSource

_EXPERT_KEY = re.compile(r"\.experts\.(?:expert_)?(\d+)\.")
_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq$)|(\.masked_bias$)|(\.attn\.bias$)")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class Target:
    """Where one checkpoint tensor lands: ``param[index]`` (times ``scale``)."""

    param: torch.Tensor
    index: tuple
    shape: tuple[int, ...]
    scale: float = 1.0

    def view(self) -> torch.Tensor:
        return self.param[self.index] if self.index else self.param


@dataclass
class LoadedModel:
    """A ready model and what the start-up log reports about it."""

    model: PescForCausalLM
    config: ModelConfig
    source: ModelSource
    dtype: torch.dtype
    device: torch.device
    quantization: QuantPlan
    num_params: int
    weight_bytes: int


def canonical_name(name: str) -> str:
    """Normalise the two expert spellings to ``experts.{e}.``."""
    return _EXPERT_KEY.sub(lambda m: f".experts.{m.group(1)}.", name)


def build_targets(model: PescForCausalLM, cfg: ModelConfig) -> dict[str, Target]:
    """Every Hugging Face tensor name the config implies, mapped onto our parameters."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.q_size, cfg.kv_size
    t: dict[str, Target] = {
        "model.embed_tokens.weight": Target(model.embed_tokens.weight, (), (cfg.vocab_size, h)),
        "model.norm.weight": Target(model.norm.weight, (), (h,)),
    }
    if model.lm_head is not None:
        t["lm_head.weight"] = Target(model.lm_head.weight, (), (cfg.vocab_size, h))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn = layer.self_attn
        t[p + "input_layernorm.weight"] = Target(layer.input_layernorm.weight, (), (h,))
        t[p + "post_attention_layernorm.weight"] = Target(layer.post_attention_layernorm.weight, (), (h,))
        for name, lo, hi in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
            t[p + f"self_attn.{name}.weight"] = Target(attn.qkv_proj.weight, (slice(lo, hi),), (hi - lo, h))
            if cfg.attention_bias:
                t[p + f"self_attn.{name}.bias"] = Target(attn.qkv_proj.bias, (slice(lo, hi),), (hi - lo,))
        t[p + "self_attn.o_proj.weight"] = Target(attn.o_proj.weight, (), (h, q))
        ffn = layer.mlp.ffn if cfg.is_pesc else layer.mlp
        t[p + "mlp.gate_proj.weight"] = Target(ffn.gate_up_proj.weight, (slice(0, inter),), (inter, h))
        t[p + "mlp.up_proj.weight"] = Target(ffn.gate_up_proj.weight, (slice(inter, 2 * inter),), (inter, h))
        t[p + "mlp.down_proj.weight"] = Target(ffn.down_proj.weight, (), (h, inter))
        if cfg.is_pesc:
            mlp = layer.mlp
            a = p + "mlp.moe_adapter."
            t[a + "router.weight"] = Target(mlp.router.weight, (), (cfg.num_experts, h))
            for e in range(cfg.num_experts):
                t[a + f"experts.{e}.adapter_down.weight"] = Target(mlp.adapter_down, (e,), (cfg.adapter_dim, h))
                t[a + f"experts.{e}.adapter_up.weight"] = Target(
                    mlp.adapter_up, (e,), (h, cfg.adapter_dim), scale=cfg.moe_scaling
                )
    return t


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
    """

    def __init__(self, targets: dict[str, Target], tied: bool, model: nn.Module, int4_modules: set[str]) -> None:
        self.targets = targets
        self.tied = tied
        self.seen: set[str] = set()
        self.lora: dict[str, dict[str, torch.Tensor]] = {}
        self.module_of = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.int4_modules = int4_modules
        self.blocks: dict[str, list[tuple[slice, Q4Blocks, str]]] = {}

    def assign(self, raw_name: str, tensor: "torch.Tensor | Q4Blocks", origin: Path, allow_lora: bool = False) -> None:
        name = canonical_name(raw_name)
        if _IGNORED.search(name) or (self.tied and name == "lm_head.weight"):
            return
        if isinstance(tensor, Q4Blocks):
            target = self.targets.get(name)
            module = self.module_of.get(id(target.param)) if target is not None else None
            if module in self.int4_modules and tuple(tensor.shape) == target.shape and name not in self.seen:
                rows = target.index[0] if target.index else slice(0, target.shape[0])
                self.blocks.setdefault(module, []).append((rows, tensor, name))
                self.seen.add(name)
                return
            tensor = tensor.dequantize()
        lora = _LORA_KEY.match(name) if allow_lora else None
        if lora is not None:
            self.lora.setdefault(lora.group(1) + ".weight", {})[lora.group(2)] = tensor
            return
        target = self.targets.get(name)
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
            value = tensor.float() * target.scale if target.scale != 1.0 else tensor
            target.view().copy_(value)
        self.seen.add(name)

    def lora_parts(self, origin: Path) -> dict[str, list[LoRAPart]]:
        """The delta's LoRA pairs, checked, grouped by the (fused) linear module they update."""
        module_of = self.module_of
        parts: dict[str, list[LoRAPart]] = {}
        for name, pair in self.lora.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{origin}: LoRA for {name!r} has only lora_{''.join(pair)}")
            target = self.targets.get(name)
            if target is None:
                raise ValueError(f"{origin}: LoRA targets unknown tensor {name!r}")
            a, b = pair["A"].float(), pair["B"].float()
            if a.shape[1] != target.shape[1] or b.shape[0] != target.shape[0] or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"{origin}: LoRA for {name!r} has A {list(a.shape)} and B {list(b.shape)}, "
                    f"which do not fit the weight {list(target.shape)}"
                )
            module = module_of.get(id(target.param))
            if module is None:
                raise ValueError(f"{origin}: LoRA for {name!r} targets a tensor that is not a linear layer's weight")
            rows = target.index[0] if target.index else slice(0, target.shape[0])
            parts.setdefault(module, []).append(LoRAPart(a, b, rows))
        return parts

    def check_complete(self, what: str) -> None:
        missing = sorted(set(self.targets) - self.seen)
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
            parts.append(f"dense bf16 weights for batches > {self.hybrid_max_rows} rows")
        return ", ".join(parts)


# Without the VNNI kernels, decode batches up to this many rows use ATen's low-bit kernels
# on CPU and larger ones dense bf16 copies (measured crossover).
CPU_LOW_BIT_MAX_ROWS = 2


def resolve_quantization(name: str, device: torch.device, dtype: torch.dtype, vnni: bool = False) -> QuantPlan:
    """``auto``: low-bit weights where decode is bandwidth-bound (CPU), none on GPUs.

    On CPU the attention and FFN linears get group-wise int4 and the LM head (tied to the
    embeddings in small models) per-channel int8, as llama.cpp's Q4_1 files have them.  With
    ``vnni`` (the CPU runs the C++ low-bit kernels, which beat bf16 at every batch size) they
    serve all batches; otherwise ATen's kernels serve small batches and dense bf16 copies
    large ones.  The CPU kernels run in bf16 whatever the activations' dtype.  An explicit
    method applies to the shared FFN only.
    """
    cpu_kernels = torch.bfloat16 if device.type == "cpu" else None
    if name != "auto":
        return QuantPlan(ffn=name, kernel_dtype=cpu_kernels if name in ("int8", "int4") else None)
    if device.type != "cpu":
        return QuantPlan()
    return QuantPlan(ffn="int4", attention="int4", lm_head="int8",
                     hybrid_max_rows=None if vnni else CPU_LOW_BIT_MAX_ROWS, kernel_dtype=torch.bfloat16)


def apply_quantization(model: PescForCausalLM, plan: QuantPlan, dtype: torch.dtype) -> None:
    rows = plan.hybrid_max_rows
    kernel_dtype = plan.kernel_dtype or dtype
    quantize_modules(model, QUANT_GROUPS["ffn"], plan.ffn, kernel_dtype, rows)
    quantize_modules(model, QUANT_GROUPS["attention"], plan.attention, kernel_dtype, rows)
    if plan.lm_head != "none":
        if model.lm_head is None:  # tied: a head module sharing the embedding matrix
            model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False, device="meta")
            model.lm_head.weight = model.embed_tokens.weight
        quantize_modules(model, ("lm_head",), plan.lm_head, kernel_dtype, rows)


def load_model(source: ModelSource, load: LoadConfig, max_positions: int | None = None) -> LoadedModel:
    """Build the model for ``source`` and fill every parameter from its checkpoint(s)."""
    cfg = ModelConfig.from_hf_config(source.config, source=str(source.path))
    device = resolve_device(load.device)
    dtype = resolve_dtype(load.dtype, device)
    with torch.device("meta"):
        model = PescForCausalLM(cfg, dispatch=load.dispatch, max_positions=max_positions)
    _materialize(model, dtype, device)
    model.rotary.build_tables(device)
    quant = resolve_quantization(load.quantization, device, dtype, vnni=device.type == "cpu" and cpu_has_vnni())
    int4_modules = {name for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and quant.method_for(name) == "int4" and device.type == "cpu"}
    assigner = _Assigner(build_targets(model, cfg), cfg.tie_word_embeddings, model, int4_modules)
    lora: dict[str, list[LoRAPart]] = {}
    if load.load_format == "dummy":
        _fill_random(assigner)
    elif source.kind == "delta":
        assert source.base is not None
        for name, tensor, origin in _source_tensors(source.base, q4_blocks=bool(int4_modules)):
            assigner.assign(name, tensor, origin)
        delta_file = source.path / "adapter_model.safetensors"
        for name, tensor in iter_tensors(delta_file):
            assigner.assign(name, tensor, delta_file, allow_lora=True)
        lora = assigner.lora_parts(delta_file)
    else:
        for name, tensor, origin in _source_tensors(source, q4_blocks=bool(int4_modules)):
            assigner.assign(name, tensor, origin)
    assigner.check_complete(str(source.path))
    _install_blocks(model, assigner, quant, dtype)
    scaling = _lora_scaling(source.delta) if source.kind == "delta" else 1.0
    unmerged = {name: parts for name, parts in lora.items() if quant.method_for(name) != "none"}
    for name, parts in lora.items():
        if name not in unmerged:
            for part in parts:
                merge_into(model.get_submodule(name).weight, part, scaling)
    apply_quantization(model, quant, dtype)
    for name, parts in unmerged.items():
        _attach_lora(model, name, parts, scaling, dtype)
    if cfg.is_pesc:
        for layer in model.layers:
            layer.mlp.finalize()
    model.eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return LoadedModel(model, cfg, source, dtype, device, quant, cfg.num_parameters, weight_bytes)


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
            layer = HybridLinear(DenseLinear(shell, kernel_dtype), layer, plan.hybrid_max_rows)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer)


def _attach_lora(model: nn.Module, name: str, parts: list[LoRAPart], scaling: float, dtype: torch.dtype) -> None:
    """Wrap the (now quantized) module ``name`` with its unmerged LoRA."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    base = getattr(parent, attr)
    device = model.embed_tokens.weight.device
    a, b = fuse_parts(parts, base.out_features, scaling, dtype, device)
    setattr(parent, attr, LoRALinear(base, a, b))


def _fill_random(assigner: _Assigner) -> None:
    """``--load-format dummy``: deterministic random weights of realistic scale, no files read.

    For benchmarking a checkpoint's shapes (e.g. Camelidae-8x7B) without its 14 GB of weights.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, target in assigner.targets.items():
        device = target.param.device
        gen = generators.setdefault(device, torch.Generator(device=device).manual_seed(0))
        if name.endswith("norm.weight"):
            value = torch.ones(target.shape, device=device)
        else:
            value = torch.randn(target.shape, generator=gen, device=device) * (target.shape[-1] ** -0.5)
        assigner.assign(name, value, Path("<dummy>"))


def _lora_scaling(delta: dict) -> float:
    """LoRA's alpha / rank, as peft applies it."""
    rank = delta.get("lora_rank")
    if not rank:
        return 1.0
    alpha = delta.get("lora_alpha")
    return float(alpha if alpha is not None else rank) / float(rank)
