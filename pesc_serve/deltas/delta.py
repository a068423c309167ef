"""Read and check one delta: a PESC delta or a plain PEFT LoRA, over a given base.

A PESC delta (what ``python -m training`` writes) is a directory with a config.json naming
its base (``base_model_name_or_path``, ``pesc_delta``, the expert geometry) and an
``adapter_model.safetensors`` holding per-layer routers, expert adapters and LoRA pairs.  A
PEFT LoRA directory has ``adapter_config.json`` and ``adapter_model.safetensors``.  Either
becomes a :class:`Delta`: per-layer :class:`ExpertSet` (or none) and fused LoRA pairs keyed by
the base's linear module names.  Every mismatch with the base stops with a message naming
the file and the tensor; nothing here touches a running model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from pesc_serve.config import ModelConfig, expert_geometry
from pesc_serve.layers.lora import LoRAPart, LoRAWeights
from pesc_serve.layers.pesc_mlp import ExpertSet

_EXPERT_SPELLING = re.compile(r"\.experts\.(?:expert_)?(\d+)\.")
_ADAPTER_KEY = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.moe_adapter\.(?:router\.weight|experts\.(\d+)\.adapter_(down|up)\.weight)$")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")


def canonical_name(name: str) -> str:
    """Normalise the two expert spellings (``experts.expert_{e}.`` Camelidae/Qwen2idae,
    ``experts.{e}.`` Sparsetral) to ``experts.{e}.``."""
    return _EXPERT_SPELLING.sub(lambda m: f".experts.{m.group(1)}.", name)


def is_adapter_tensor(name: str) -> bool:
    """A router or expert-adapter tensor (canonical name)?"""
    return _ADAPTER_KEY.match(name) is not None


def lora_target(name: str) -> tuple[str, str] | None:
    """(target weight name, "A" or "B") of a LoRA tensor name, else None."""
    m = _LORA_KEY.match(name)
    return (m.group(1) + ".weight", m.group(2)) if m else None


@dataclass(frozen=True)
class LoRASite:
    """Where the LoRA of one checkpoint weight lands: rows of a (fused) linear module."""

    module: str  # e.g. "layers.3.self_attn.qkv_proj"
    rows: slice
    shape: tuple[int, int]  # the checkpoint weight's [out, in]


@dataclass
class Delta:
    """One fine-tune's additions to the base: experts per layer and unmerged LoRA pairs."""

    name: str
    origin: str  # the file or directory it came from, for messages
    experts: list[ExpertSet] | None = None  # per layer; None: LoRA only
    lora: dict[str, LoRAWeights] = field(default_factory=dict)  # linear module name -> fused pair
    file_bytes: int = 0
    stored_dtype: torch.dtype | None = None  # the adapters' dtype in the file

    @property
    def nbytes(self) -> int:
        experts = sum(e.nbytes for e in self.experts or [])
        return experts + sum(w.nbytes for w in self.lora.values())

    @property
    def num_experts(self) -> int:
        return self.experts[0].num_experts if self.experts else 0

    @property
    def topk(self) -> int:
        return self.experts[0].topk if self.experts else 0

    def describe(self) -> str:
        parts = []
        if self.experts:
            e = self.experts[0]
            parts.append(f"{e.num_experts} adapter experts, top-{e.topk}, adapter dim {e.adapter_dim}")
        if self.lora:
            rank = max(a.shape[0] for w in self.lora.values() for a in w.a)
            parts.append(f"rank-{rank} LoRA on {len(self.lora)} linears")
        size = f"{self.nbytes / 2**20:.1f} MiB resident, {self.file_bytes / 2**20:.1f} MiB on disk"
        return f"{self.name}: " + (", ".join(parts) or "no tensors") + f" ({size})"


class ExpertCollector:
    """Routers and adapters of a checkpoint, checked as they arrive, stacked per layer."""

    def __init__(self, cfg: ModelConfig, geometry: tuple[int, int, int, float], origin: str, context: str) -> None:
        self.num_layers, self.hidden = cfg.num_layers, cfg.hidden_size
        self.num_experts, self.topk, self.adapter_dim, self.scaling = geometry
        self.origin, self.context = origin, context
        self.tensors: dict[str, torch.Tensor] = {}
        self.dtype: torch.dtype | None = None

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        m = _ADAPTER_KEY.match(name)
        if m is None or int(m.group(1)) >= self.num_layers:
            return None
        if m.group(2) is None:
            return (self.num_experts, self.hidden)
        if int(m.group(2)) >= self.num_experts:
            return None
        return (self.adapter_dim, self.hidden) if m.group(3) == "down" else (self.hidden, self.adapter_dim)

    def add(self, raw_name: str, name: str, tensor: torch.Tensor, origin: Path | str) -> None:
        shape = self.expected_shape(name)
        if shape is None:
            raise ValueError(f"{origin}: unexpected tensor {raw_name!r} (not part of {self.context})")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{origin}: tensor {raw_name!r} has shape {list(tensor.shape)}, expected {list(shape)} "
                             f"from {self.context}")
        if name in self.tensors:
            raise ValueError(f"{origin}: tensor {raw_name!r} appears twice")
        self.tensors[name] = tensor
        self.dtype = self.dtype or tensor.dtype

    def expected_names(self) -> Iterator[str]:
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}.mlp.moe_adapter."
            yield p + "router.weight"
            for e in range(self.num_experts):
                yield p + f"experts.{e}.adapter_down.weight"
                yield p + f"experts.{e}.adapter_up.weight"

    def missing(self) -> list[str]:
        return [n for n in self.expected_names() if n not in self.tensors]

    def build(self, dtype: torch.dtype, device: torch.device) -> list[ExpertSet]:
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"{self.origin}: checkpoint is missing tensor(s) {shown}")
        layers = []
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}.mlp.moe_adapter."
            t = self.tensors
            down = torch.stack([t[p + f"experts.{e}.adapter_down.weight"] for e in range(self.num_experts)])
            up = torch.stack([t[p + f"experts.{e}.adapter_up.weight"] for e in range(self.num_experts)])
            up = up.float() * self.scaling if self.scaling != 1.0 else up
            layers.append(ExpertSet(
                t[p + "router.weight"].to(device=device, dtype=dtype).contiguous(),
                down.to(device=device, dtype=dtype).contiguous(),
                up.to(device=device, dtype=dtype).contiguous(),
                self.topk,
                self.scaling,
            ))
        self.tensors.clear()
        return layers


def lora_weights(pairs: dict[str, dict[str, torch.Tensor]], sites: dict[str, LoRASite], scaling: float,
              origin: Path | str, dtype: torch.dtype, device: torch.device) -> dict[str, LoRAWeights]:
    """Checked LoRA pairs (target weight name -> {"A", "B"}) grouped per (fused) linear module.

    A float32 CPU model keeps the pairs in the dtype the file stores them in (bf16 or float32:
    what the row kernel reads, computing in float32), so a delta costs the bytes of its file;
    elsewhere they take the model's dtype."""
    parts: dict[str, list[LoRAPart]] = {}
    stored: set[torch.dtype] = set()
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{origin}: LoRA for {name!r} has only lora_{''.join(pair)}")
        site = sites.get(name)
        if site is None:
            raise ValueError(f"{origin}: LoRA targets {name!r}, which is not one of the base's attention or FFN "
                             f"projections (LoRA on embeddings, norms or the LM head is not supported)")
        stored |= {pair["A"].dtype, pair["B"].dtype}
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != site.shape[1] or b.shape[0] != site.shape[0] \
                or a.shape[0] != b.shape[1]:
            raise ValueError(f"{origin}: LoRA for {name!r} has A {list(a.shape)} and B {list(b.shape)}, which do not "
                             f"fit the base's weight {list(site.shape)} (a delta for another base?)")
        parts.setdefault(site.module, []).append(LoRAPart(a, b, site.rows))
    keep = device.type == "cpu" and dtype == torch.float32 and stored == {torch.bfloat16}
    held = torch.bfloat16 if keep else dtype
    return {module: LoRAWeights(sorted(p, key=lambda part: part.rows.start or 0), scaling, held, device)
            for module, p in parts.items()}


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def safetensors_items(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of ``path`` in memory of its own.

    ``get_tensor`` returns views into a private mapping of the whole file: one tensor kept as
    it is (a bf16 LoRA A, which needs no conversion) would keep every page of the file that the
    read touched resident beside the packed copies, 36.5 MiB more per camelidae delta."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            for name in names:
                yield name, f.get_tensor(name).clone()
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({exc})") from None


@dataclass(frozen=True)
class DeltaSource:
    """A delta found on disk, not yet read: what ``--adapters NAME=PATH`` resolves to."""

    name: str
    path: Path  # the directory
    kind: str  # "pesc" | "peft"
    config: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE


def find_delta(name: str, path: Path) -> DeltaSource:
    """The delta directory at ``path``, its kind and config; ValueError naming what is wrong."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ValueError(f"{path}: a delta is a directory (a PESC delta with config.json, or a PEFT LoRA with "
                         f"adapter_config.json), each with {WEIGHTS_FILE}")
    if (path / "adapter_config.json").is_file():
        kind, config = "peft", read_json(path / "adapter_config.json")
    elif (path / "config.json").is_file():
        config = read_json(path / "config.json")
        if "pesc_delta" not in config:
            raise ValueError(f"{path}/config.json: not a PESC delta (no 'pesc_delta'); serve a full model with "
                             f"--model, and pass deltas over it with --adapters")
        kind = "pesc"
    else:
        raise ValueError(f"{path}: no adapter_config.json (PEFT LoRA) or config.json (PESC delta)")
    if not (path / WEIGHTS_FILE).is_file():
        pickled = [p for p in PICKLE_FILES if (path / p).is_file()]
        if pickled:
            raise ValueError(f"{path / pickled[0]}: pickled weights are not loaded (unpickling can run code); "
                             f"convert them to {WEIGHTS_FILE}")
        raise ValueError(f"{path}: no {WEIGHTS_FILE}")
    return DeltaSource(name, path, kind, config)


def lora_scaling(source: DeltaSource) -> float:
    """alpha / rank as PEFT applies it (alpha / sqrt(rank) with rsLoRA)."""
    cfg = source.config
    if source.kind == "pesc":
        meta = cfg.get("pesc_delta") or {}
        rank, alpha = meta.get("lora_rank"), meta.get("lora_alpha")
        if not rank:
            return 1.0
        return float(alpha if alpha is not None else rank) / float(rank)
    where = source.path / "adapter_config.json"
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters (use_dora) are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{where}: per-module rank_pattern / alpha_pattern are not supported")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{where}: modules_to_save (fully trained extra modules) are not supported")
    try:
        rank = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", rank))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: needs a positive integer 'r' and a numeric 'lora_alpha'") from None
    if rank <= 0:
        raise ValueError(f"{where}: 'r' must be positive, got {rank}")
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def check_declared_geometry(source: DeltaSource, base: ModelConfig, base_name: str) -> None:
    """A delta whose config states another hidden size, depth or vocabulary than the base."""
    cfg = source.config
    for key, ours in (("hidden_size", base.hidden_size), ("num_hidden_layers", base.num_layers),
                      ("vocab_size", base.vocab_size)):
        theirs = cfg.get(key)
        if theirs is not None and theirs != ours:
            raise ValueError(f"{source.path}: the delta's {key} is {theirs}, the base {base_name}'s is {ours}: "
                             f"a delta for another base")


def read_delta(source: DeltaSource, base: ModelConfig, base_name: str, sites: dict[str, LoRASite],
               dtype: torch.dtype, device: torch.device) -> Delta:
    """Read and check ``source`` against the base; raises ValueError naming the file and the problem."""
    check_declared_geometry(source, base, base_name)
    origin = source.weights
    context = f"the base model {base_name!r} (hidden {base.hidden_size}, {base.num_layers} layers)"
    experts = None
    if source.kind == "pesc":
        # A delta over a PESC base (a crafted model) may leave the expert geometry to the base's config.
        inherited = {"num_experts": base.num_experts, "topk": base.topk, "adapter_dim": base.adapter_dim,
                     "moe_scaling": base.moe_scaling} if base.is_pesc and "num_experts" not in source.config else {}
        geometry = expert_geometry({**source.config, **inherited}, str(source.path / "config.json"))
        if geometry[0]:
            experts = ExpertCollector(base, geometry, str(origin),
                                      f"{context} with the delta's {geometry[0]} experts of dim {geometry[2]}")
    scaling = lora_scaling(source)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for raw_name, tensor in safetensors_items(origin):
        name = canonical_name(raw_name)
        target = lora_target(name)
        if target is not None:
            pairs.setdefault(target[0], {})[target[1]] = tensor
        elif experts is not None and is_adapter_tensor(name):
            experts.add(raw_name, name, tensor, origin)
        else:
            raise ValueError(f"{origin}: unexpected tensor {raw_name!r} (a delta holds routers, expert adapters "
                             f"and LoRA pairs over {context})")
    stored = experts.dtype if experts is not None else None
    delta = Delta(
        name=source.name,
        origin=str(source.path),
        experts=experts.build(dtype, device) if experts is not None else None,
        lora=lora_weights(pairs, sites, scaling, origin, dtype, device),
        file_bytes=sum(p.stat().st_size for p in _files(source.path)),
        stored_dtype=stored,
    )
    if delta.experts is None and not delta.lora:
        raise ValueError(f"{origin}: holds no LoRA pairs or experts")
    return delta


def _files(directory: Path) -> Iterable[Path]:
    return (p for p in directory.iterdir() if p.is_file())
