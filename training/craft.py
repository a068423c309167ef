"""Upcycle a dense checkpoint into a PESC checkpoint (a delta over its base).

Every layer's FFN becomes the shared FFN; each expert is a bottleneck adapter whose
up-projection starts at zero, so the crafted model decodes exactly like its base until
it is trained.  Down-projections and routers get nn.Linear's kaiming-uniform(a=sqrt(5)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from pesc_serve.config import ModelConfig
from pesc_serve.registry import resolve_model

CRAFTED_NOTE = "freshly crafted: adapter up-projections are zero, so it decodes exactly like its base"


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init for a [out, in] weight: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def craft_tensors(cfg: ModelConfig, num_experts: int, adapter_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Router and adapter tensors under Camelidae key names (``experts.expert_{e}``)."""
    gen = torch.Generator().manual_seed(seed)
    h = cfg.hidden_size
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}.mlp.moe_adapter."
        tensors[prefix + "router.weight"] = kaiming_uniform((num_experts, h), gen)
        for e in range(num_experts):
            tensors[prefix + f"experts.expert_{e}.adapter_down.weight"] = kaiming_uniform((adapter_dim, h), gen)
            tensors[prefix + f"experts.expert_{e}.adapter_up.weight"] = torch.zeros(h, adapter_dim)
    return tensors


def craft(
    base: str,
    out_dir: Path,
    num_experts: int = 8,
    topk: int = 2,
    adapter_dim: int = 64,
    moe_scaling: float = 0.25,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write ``out_dir`` = config.json (PESC keys + base pointer) + adapter_model.safetensors."""
    if num_experts < 1 or not 1 <= topk <= num_experts or adapter_dim < 1:
        raise ValueError(f"need num_experts >= 1, 1 <= topk <= num_experts, adapter_dim >= 1 "
                         f"(got {num_experts}, {topk}, {adapter_dim})")
    source = resolve_model(base)
    cfg = ModelConfig.from_hf_config(source.config, source=base)
    if cfg.is_pesc:
        raise ValueError(f"{base} is already a PESC model ({cfg.num_experts} experts); craft from a dense model")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in craft_tensors(cfg, num_experts, adapter_dim, seed).items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "base_model_name_or_path": base,
        "num_experts": num_experts,
        "topk": topk,
        "adapter_dim": adapter_dim,
        "moe_scaling": moe_scaling,
        "moe_dtype": str(dtype).removeprefix("torch."),
        "pesc_delta": {"status": "crafted", "note": CRAFTED_NOTE, "seed": seed},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
