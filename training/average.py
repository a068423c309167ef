"""Average trained deltas in weight space (checkpoint averaging, as in SWA or a model soup).

A run that ends at a constant learning rate stops wherever its last batches pushed it; one that
anneals settles into its minimum but may drift from what the noisy iterate knew (issue #13:
annealing v7 raised the right tool call and lowered maths).  The mean of two points of one
trajectory sits between them and often keeps the best of both.  It is only meaningful for
deltas on one trajectory: one run's checkpoints, or a run and its continuation
(``train --init-from``), so every delta here must have the same tensors, the same base and the
same PESC shape.  LoRA factors are averaged one by one, like every other parameter.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pesc_serve.deltas.delta import WEIGHTS_FILE as DELTA_WEIGHTS

SHAPE_KEYS = ("base_model_name_or_path", "num_experts", "topk", "adapter_dim", "moe_scaling", "moe_dtype")
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets")


def _read(delta: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path, weights = delta / "config.json", delta / DELTA_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise ValueError(f"{delta}: not a trained delta (needs config.json and {DELTA_WEIGHTS})")
    cfg = json.loads(cfg_path.read_text())
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return cfg, tensors


def _same(name: str, first: Path, other: Path, a: dict, b: dict, keys: tuple[str, ...]) -> None:
    diff = [k for k in keys if a.get(k) != b.get(k)]
    if diff:
        raise ValueError(f"{other} differs from {first} in {name} ({', '.join(diff)}): "
                         f"only deltas of one training trajectory can be averaged")


def average_deltas(deltas: list[Path], out: Path, weights: list[float] | None = None, note: str = "") -> Path:
    """Write the weighted mean of ``deltas`` (default: equal weights) as a new delta in ``out``."""
    if len(deltas) < 2:
        raise ValueError("give at least two deltas to average")
    weights = weights or [1.0] * len(deltas)
    if len(weights) != len(deltas) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights: one non-negative weight per delta, not all zero (got {weights} for {len(deltas)})")
    total = sum(weights)
    weights = [w / total for w in weights]
    read = [_read(Path(d)) for d in deltas]
    first_cfg, first_tensors = read[0]
    for path, (cfg, tensors) in zip(deltas[1:], read[1:]):
        _same("its model", deltas[0], path, first_cfg, cfg, SHAPE_KEYS)
        _same("its LoRA", deltas[0], path, first_cfg.get("pesc_delta", {}), cfg.get("pesc_delta", {}), LORA_KEYS)
        if tensors.keys() != first_tensors.keys():
            raise ValueError(f"{path} and {deltas[0]} hold different tensors: only deltas of one training "
                             f"trajectory can be averaged")
        bad = [k for k in tensors if tensors[k].shape != first_tensors[k].shape]
        if bad:
            raise ValueError(f"{path}: {bad[0]} has shape {tuple(tensors[bad[0]].shape)}, "
                             f"{deltas[0]} {tuple(first_tensors[bad[0]].shape)}")
    mean = {}
    for key, ref in first_tensors.items():
        acc = sum(w * tensors[key].float() for w, (_, tensors) in zip(weights, read))
        mean[key] = acc.to(ref.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(mean, str(out / DELTA_WEIGHTS), metadata={"format": "pt"})
    cfg = copy.deepcopy(first_cfg)
    info = cfg.setdefault("pesc_delta", {})
    info["status"] = "trained"
    info["averaged_from"] = [{"delta": str(d), "weight": round(w, 6)} for d, w in zip(deltas, weights)]
    info["note"] = note or "the weighted mean of " + ", ".join(str(d) for d in deltas)
    for key in ("final_loss", "train_minutes"):
        info.pop(key, None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
