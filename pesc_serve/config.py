"""Validated configuration dataclasses, passed down explicitly (no global state).

User mistakes raise ``ValueError`` with a message a user understands; the CLI and the
HTTP layer turn those into plain errors instead of tracebacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Hugging Face `model_type` values we serve, mapped to the base decoder family.
MODEL_TYPE_FAMILY = {
    "llama": "llama",
    "camelidae": "llama",
    "mistral": "mistral",
    "sparsetral": "mistral",
    "qwen2": "qwen2",
    "qwen2idae": "qwen2",
}
# Camelidae's modeling code hard-codes RoPE base 10000 for every size (DESIGN.md section 2).
CAMELIDAE_ROPE_THETA = 10000.0

QUANTIZATION_CHOICES = ("none", "nf4", "int8", "int4")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
DISPATCH_CHOICES = ("auto", "grouped", "dense", "gather", "padded", "loop")
KV_CACHE_DTYPE_CHOICES = ("auto", "model", "float32", "bfloat16", "float16")


def _require(cfg: dict[str, Any], key: str, source: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{source}: config.json has no '{key}'")
    return cfg[key]


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: '{name}' must be a positive integer, got {value!r}")
    return value


def uses_camelidae_code(cfg: dict[str, Any]) -> bool:
    """True for checkpoints run by the authors' Camelidae modeling code.

    Older uploads say ``model_type: llama`` but point ``auto_map``/``architectures`` at
    ``modeling_camelidae``; pesc-serve's own exports say plain ``llama`` and keep their
    real ``rope_theta``.
    """
    if str(cfg.get("model_type", "")).lower() == "camelidae":
        return True
    remote = str(cfg.get("auto_map", "")) + str(cfg.get("architectures", ""))
    return "camelidae" in remote.lower()


@dataclass(frozen=True)
class ModelConfig:
    """Geometry of a Llama-family decoder, with the PESC fields when the MLP is sparse.

    ``num_experts == 0`` means a dense model.  Built from a Hugging Face config.json by
    :meth:`from_hf_config`, which reads every value from the file (class defaults of the
    remote code differ between checkpoints).
    """

    model_type: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    num_experts: int = 0
    topk: int = 0
    adapter_dim: int = 0
    moe_scaling: float = 1.0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def is_pesc(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_parameters(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * h * i + self.num_experts * (h + 2 * h * self.adapter_dim)
        layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "model") -> "ModelConfig":
        """Parse a Hugging Face config.json dict; PESC fields are detected by their keys."""
        model_type = str(cfg.get("model_type", "")).lower()
        if model_type not in MODEL_TYPE_FAMILY:
            known = ", ".join(sorted(MODEL_TYPE_FAMILY))
            raise ValueError(f"{source}: unsupported model_type {model_type!r} (supported: {known})")
        family = MODEL_TYPE_FAMILY[model_type]
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{source}: unsupported hidden_act {act!r}; only silu is implemented")
        hidden = _positive_int(_require(cfg, "hidden_size", source), "hidden_size", source)
        heads = _positive_int(_require(cfg, "num_attention_heads", source), "num_attention_heads", source)
        kv_heads = _positive_int(cfg.get("num_key_value_heads") or heads, "num_key_value_heads", source)
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = cfg.get("head_dim") or hidden // heads
        num_experts, topk, adapter_dim, moe_scaling = expert_geometry(cfg, source)
        rope_theta = float(cfg.get("rope_theta", 10000.0))
        if uses_camelidae_code(cfg):
            rope_theta = CAMELIDAE_ROPE_THETA
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in ("linear", "llama3", "default"):
                raise ValueError(f"{source}: unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
            if kind == "default":
                rope_scaling = None
        sliding = cfg.get("sliding_window") if family in ("mistral", "qwen2") else None
        if family == "qwen2":
            # Qwen2 windows only layers >= max_window_layers, and only with use_sliding_window.
            first_windowed = int(cfg.get("max_window_layers", 0) or 0)
            if not cfg.get("use_sliding_window", False) or first_windowed >= int(cfg.get("num_hidden_layers", 0)):
                sliding = None
            elif first_windowed > 0:
                raise ValueError(f"{source}: per-layer sliding windows (max_window_layers={first_windowed}) are not supported")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(
            model_type=model_type,
            family=family,
            vocab_size=_positive_int(_require(cfg, "vocab_size", source), "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_positive_int(_require(cfg, "intermediate_size", source), "intermediate_size", source),
            num_layers=_positive_int(_require(cfg, "num_hidden_layers", source), "num_hidden_layers", source),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            num_experts=num_experts,
            topk=topk if num_experts else 0,
            adapter_dim=adapter_dim if num_experts else 0,
            moe_scaling=moe_scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


MAX_EXPERTS = 64  # per delta and layer (the C++ router's limit)


def expert_geometry(cfg: dict[str, Any], source: str) -> tuple[int, int, int, float]:
    """(num_experts, topk, adapter_dim, moe_scaling) of a PESC config (zeros when dense): the
    one parser for full checkpoints and deltas alike."""
    try:
        num_experts = int(cfg.get("num_experts") or 0)
        topk = int(cfg.get("topk") or cfg.get("num_experts_per_tok") or 0)
        adapter_dim = int(cfg.get("adapter_dim") or 0)
        moe_scaling = float(cfg.get("moe_scaling", 1.0))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: num_experts, topk, adapter_dim and moe_scaling must be numbers ({exc})") from None
    if not num_experts:
        return 0, 0, 0, 1.0
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"{source}: num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"{source}: topk must be in [1, num_experts={num_experts}], got {topk}")
    _positive_int(adapter_dim, "adapter_dim", source)
    return num_experts, topk, adapter_dim, moe_scaling


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map ``--dtype`` (the activations' dtype) to a torch dtype.

    ``auto``: bf16 (or fp16) on GPUs; float32 on CPUs, where the many small matmuls of
    attention, routers and adapters cost several times more in bf16 than in float32 (a
    fixed per-call cost of the bf16 GEMM path), while the big weight matrices run through
    low-bit or bf16 kernels anyway (see the quantization plan).
    """
    if name not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return device


@dataclass(frozen=True)
class LoadConfig:
    """How to materialise the weights: where, in which dtype, which quantization.

    The library default is no quantization (training and tests need plain linears); the
    server's CLI asks for ``auto``, the machine-adapted fast path.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    quantization: str = "none"
    dispatch: str = "auto"
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarks)
    adapters: tuple[tuple[str, str], ...] = ()  # --adapters NAME=PATH: deltas served beside the model

    def __post_init__(self) -> None:
        names = [name for name, _ in self.adapters]
        for name, path in self.adapters:
            if not name or not path or not name.strip():
                raise ValueError(f"--adapters takes NAME=PATH (or a delta alias), got {name!r}={path!r}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"--adapters: the name {dupes[0]!r} is given twice")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"--load-format must be auto or dummy, got {self.load_format!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATION_CHOICES + ("auto",):
            choices = ", ".join(("auto",) + QUANTIZATION_CHOICES)
            raise ValueError(f"--quantization must be one of {choices}, got {self.quantization!r}")
        if self.dispatch not in DISPATCH_CHOICES:
            raise ValueError(f"--dispatch must be one of {', '.join(DISPATCH_CHOICES)}, got {self.dispatch!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling and KV-cache limits of the engine."""

    max_num_seqs: int = 64
    max_model_len: int | None = None
    max_num_batched_tokens: int = 512
    block_size: int = 16
    kv_cache_memory_gb: float | None = None
    enable_prefix_caching: bool = True
    max_queue_len: int = 256
    seed: int = 0
    cpu_kernels: str = "off"  # auto|on|off: the C++ decode step on CPU (the CLI asks for auto)
    kv_cache_dtype: str = "model"  # see resolve_kv_cache_dtype (the CLI asks for auto)
    max_loaded_adapters: int | None = None  # deltas resident at once beside the --model (None: all)

    def __post_init__(self) -> None:
        if self.cpu_kernels not in ("auto", "on", "off"):
            raise ValueError(f"--cpu-kernels must be auto, on or off, got {self.cpu_kernels!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_CHOICES:
            choices = ", ".join(KV_CACHE_DTYPE_CHOICES)
            raise ValueError(f"--kv-cache-dtype must be one of {choices}, got {self.kv_cache_dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queue_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"--max-model-len must be positive, got {self.max_model_len}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory_gb}")
        if self.max_loaded_adapters is not None and (isinstance(self.max_loaded_adapters, bool) or not isinstance(
                self.max_loaded_adapters, int) or self.max_loaded_adapters < 1):
            raise ValueError(f"--max-loaded-adapters must be a positive integer, got {self.max_loaded_adapters!r}")


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-facing settings."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    request_timeout_s: float | None = None
    shutdown_timeout_s: float = 30.0  # on SIGTERM, running requests get this long to finish
    max_body_bytes: int = 8 * 1024 * 1024
    enable_runtime_adapters: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"--request-timeout must be positive, got {self.request_timeout_s}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout_s}")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's element type.

    ``model``: the model's dtype.  ``auto``: float16 for a float32 model on CPU, where
    attention over long contexts reads the cache faster than it computes (half the bytes;
    llama.cpp's default cache type too), else the model's dtype.
    """
    if name == "auto":
        return torch.float16 if device.type == "cpu" and model_dtype == torch.float32 else model_dtype
    if name == "model":
        return model_dtype
    return getattr(torch, name)
