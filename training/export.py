"""Write what training produced: a small delta over the base (default) or a full HF directory.

Delta (``config.json`` + ``adapter_model.safetensors``, what ``--model DIR`` and the bundled
camelidae use): routers ``[E, H]``, adapters ``experts.expert_{e}.adapter_down [r, H]`` /
``adapter_up [H, r]`` (unscaled; the loader folds in ``moe_scaling``) and LoRA pairs
``<projection>.lora_A.weight [rank, in]`` / ``lora_B.weight [out, rank]``, merged by the loader
with scaling ``lora_alpha / lora_rank``.

Merged (``--merge``): the base with LoRA folded in plus the experts, as one Hugging Face
directory in the Camelidae key layout (``model_type`` kept from the base, so its real
``rope_theta`` is honoured), with the tokenizer saved next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pesc_serve.config import LoadConfig, ModelConfig
from pesc_serve.models.loader import build_targets, load_model
from pesc_serve.registry import ALIASES, ModelSource
from training.trainable import TrainableModel

PESC_KEYS = ("num_experts", "topk", "adapter_dim", "moe_scaling")


def delta_tensors(tm: TrainableModel, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Hugging Face names -> trained tensors (routers, unscaled adapters, LoRA pairs)."""
    out: dict[str, torch.Tensor] = {}
    for layer, bank in enumerate(tm.banks):
        p = f"model.layers.{layer}.mlp.moe_adapter."
        out[p + "router.weight"] = bank.router.detach()
        for e in range(bank.num_experts):
            out[p + f"experts.expert_{e}.adapter_down.weight"] = bank.adapter_down[e].detach()
            out[p + f"experts.expert_{e}.adapter_up.weight"] = bank.adapter_up[e].detach()
    for layer, prefix, mod in tm.lora_modules():
        for name in mod.lora_A:
            key = f"model.layers.{layer}.{prefix}.{name}"
            out[key + ".lora_A.weight"] = mod.lora_A[name].detach()
            out[key + ".lora_B.weight"] = mod.lora_B[name].detach()
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def expert_config(tm: TrainableModel) -> dict[str, Any]:
    """The PESC config keys of the trained experts (none for a LoRA-only model)."""
    if not tm.has_experts:
        return {}
    bank = tm.banks[0]
    return {"num_experts": bank.num_experts, "topk": bank.topk, "adapter_dim": bank.adapter_down.shape[1],
            "moe_scaling": bank.moe_scaling, "moe_dtype": "bfloat16"}


def base_pointer(source: ModelSource, model_arg: str) -> str:
    """What the new delta's ``base_model_name_or_path`` says: an alias, or an absolute path."""
    if source.kind == "delta":
        raw = json.loads((source.path / "config.json").read_text())
        if raw.get("pesc_delta", {}).get("lora_rank"):
            raise ValueError(
                f"{model_arg} already carries LoRA weights; a new delta cannot hold both. Train from a freshly "
                f"crafted model, resume the run that made it (--resume), or export with --merge"
            )
        base = str(raw["base_model_name_or_path"])
        return base if base in ALIASES else str((source.path / base).resolve()) if not Path(base).is_absolute() else base
    if ModelConfig.from_hf_config(source.config).is_pesc:
        raise ValueError(
            f"{model_arg} is a full PESC checkpoint: a delta cannot override the experts it already holds; "
            f"pass --merge to write a full model instead"
        )
    return model_arg if model_arg in ALIASES else str(Path(model_arg).resolve())


def write_delta(tm: TrainableModel, source: ModelSource, model_arg: str, out_dir: Path, info: dict[str, Any]) -> Path:
    """config.json (Camelidae PESC keys + base pointer + ``pesc_delta`` info) + safetensors."""
    base = base_pointer(source, model_arg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(delta_tensors(tm), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config: dict[str, Any] = {"base_model_name_or_path": base}
    config.update(expert_config(tm))
    config["pesc_delta"] = dict(info)
    if tm.cfg.lora is not None:
        config["pesc_delta"].update(lora_rank=tm.cfg.lora.rank, lora_alpha=tm.cfg.lora.alpha,
                                    lora_targets=list(tm.cfg.lora.targets))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def write_merged(tm: TrainableModel, source: ModelSource, out_dir: Path, tokenizer, info: dict[str, Any],
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """Reload the base in float32, fold LoRA in, set the trained experts, write a full HF dir."""
    lm = load_model(source, LoadConfig(model=str(source.path), dtype="float32", device="cpu", quantization="none"))
    mc = lm.config
    targets = build_targets(lm.model, mc)
    delta = delta_tensors(tm, torch.float32)
    scaling = tm.cfg.lora.scaling if tm.cfg.lora is not None else 1.0
    tensors = {}
    with torch.no_grad():
        for name, value in delta.items():
            if name.endswith(".lora_A.weight"):
                stem = name[: -len(".lora_A.weight")]
                b = delta[stem + ".lora_B.weight"]
                view = targets[stem + ".weight"].view()
                view.copy_(view + scaling * (b @ value))
            elif not name.endswith(".lora_B.weight"):  # routers and (unscaled) adapters, as trained
                tensors[name] = value.to(dtype).contiguous()
    for name, target in targets.items():
        tensors[name] = target.view().float().to(dtype).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in source.config.items() if k not in ("pesc_delta", "base_model_name_or_path")}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if tm.has_experts:
        config.update(expert_config(tm), output_router_logits=False)
    config["pesc_training"] = dict(info)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
