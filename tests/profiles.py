"""The two configurations the engine and HTTP suites run under.

* ``defaults``: what ``python -m pesc_serve`` runs without flags on the bundled model, read
  from the CLI's own parser so the two cannot drift apart: int4/int8 weights (VNNI kernels
  where the CPU has them), the C++ decode step, a float16 KV cache.  The bundled model's base
  arrives quantized (a Q4_1 GGUF) and ``auto`` keeps it so; the tiny test checkpoints are
  float Hugging Face directories, which ``auto`` would keep in float32, so the profile asks
  for the same int4 plan (``--quantization int4``) to run the kernels users run.
* ``exact``: float32 weights, the PyTorch path and a float32 cache: the numerical reference.
"""

from __future__ import annotations

import dataclasses

from pesc_serve.__main__ import configs_from_args, parse_args
from pesc_serve.config import EngineConfig, LoadConfig

PROFILES = ("defaults", "exact")


def load_config(profile: str, model: str) -> LoadConfig:
    if profile == "defaults":
        load, _, _ = configs_from_args(parse_args(["--model", model, "--device", "cpu"]))
        if load.quantization == "auto":
            load = dataclasses.replace(load, quantization="int4")
        return load
    if profile == "exact":
        return LoadConfig(model=model, dtype="float32", device="cpu", quantization="none")
    raise ValueError(f"unknown profile {profile!r}")


def engine_config(profile: str, **sizes) -> EngineConfig:
    """The profile's engine flags with the test's sizes (max_num_seqs, max_model_len, ...)."""
    if profile == "defaults":
        _, base, _ = configs_from_args(parse_args([]))
    elif profile == "exact":
        base = EngineConfig(cpu_kernels="off", kv_cache_dtype="model")
    else:
        raise ValueError(f"unknown profile {profile!r}")
    return dataclasses.replace(base, **sizes)


# What a profile decides; the sizes (sequences, lengths, budgets) stay the test's.
PROFILE_FIELDS = ("cpu_kernels", "kv_cache_dtype")


def with_profile(profile: str, sizes: EngineConfig) -> EngineConfig:
    """``sizes`` with the profile's kernels and KV-cache type."""
    chosen = engine_config(profile)
    return dataclasses.replace(sizes, **{name: getattr(chosen, name) for name in PROFILE_FIELDS})
