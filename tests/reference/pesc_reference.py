"""A slow, deliberately plain reference for Llama/Mistral/Qwen2 decoders and their PESC variants.

Written from DESIGN.md sections 1-2 and the Hugging Face modeling code, and independent of
``pesc_serve`` on purpose (it imports nothing from it): the parity tests compare the serving
engine against this file, so the two must not share bugs.

What it does, step by step, exactly like the HF eager code paths:

* reads a Hugging Face directory itself: ``config.json``; weights from ``model.safetensors``,
  sharded ``model-*.safetensors`` + ``model.safetensors.index.json``, ``pytorch_model.bin`` or
  sharded ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json`` (``torch.load`` with
  ``weights_only=True``).  Tensor names stay the unfused HF ones.
* RMSNorm: ``w * (x / sqrt(mean(x^2) + eps))`` computed in float32 (``LlamaRMSNorm``).
* attention: separate q/k/v/o projections (q/k/v biases for Qwen2 models), rotate-half RoPE,
  GQA by repeating K/V heads (``repeat_kv``), eager ``softmax(QK^T / sqrt(d) + mask) V`` with an
  explicit additive mask, softmax in float32.
* RoPE base: ``rope_theta`` from config.json, EXCEPT for Camelidae (``model_type`` camelidae, or
  an ``auto_map``/``architectures`` pointing at ``modeling_camelidae``), whose modeling code
  hard-codes 10000 for every size.
* sliding window (Mistral and Sparsetral only, when config.json has ``sliding_window``):
  Hugging Face Mistral's convention, ``transformers.masking_utils.sliding_window_overlay``:
  query at position ``i`` sees key ``j`` iff ``j <= i`` and ``j > i - sliding_window``, i.e. the
  last ``sliding_window`` positions INCLUDING itself.  Qwen2 models are never windowed here
  (the released Qwen1.5 bases say ``use_sliding_window: false``).
* PESC MLP as the authors' code does it: dense SwiGLU FFN ``F`` once; router on the FFN INPUT
  ``x``; top-k of the router logits, softmax over those k only; ``F.repeat_interleave(k)``; a
  Python loop over experts with boolean masks, each expert giving
  ``F + moe_scaling * adapter_up(GELU_exact(adapter_down(F)))``; then the k rows of a token are
  summed with their routing weights.  (Because the k weights sum to one this equals
  ``F + s * sum_j p_j A_j(F)`` from DESIGN.md, but it is computed the authors' way.)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

_EXPERT_RE = re.compile(r"\.experts\.(?:expert_)?(\d+)\.")
_FAMILIES = {
    "llama": "llama",
    "camelidae": "llama",
    "mistral": "mistral",
    "sparsetral": "mistral",
    "qwen2": "qwen2",
    "qwen2idae": "qwen2",
}


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory, keyed by their file names (experts normalised)."""
    directory = Path(directory)
    files: list[Path]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [directory / name for name in sorted(set(weight_map.values()))]
            break
    else:
        if (directory / "model.safetensors").is_file():
            files = [directory / "model.safetensors"]
        elif (directory / "pytorch_model.bin").is_file():
            files = [directory / "pytorch_model.bin"]
        else:
            raise FileNotFoundError(f"{directory}: no weights")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            part = load_file(str(path))
        else:
            part = torch.load(str(path), map_location="cpu", weights_only=True)
        for name, tensor in part.items():
            # Both expert spellings: experts.expert_{e}. (Camelidae, Qwen2idae), experts.{e}. (Sparsetral).
            state[_EXPERT_RE.sub(lambda m: f".experts.{m.group(1)}.", name)] = tensor
    return state


def is_camelidae(config: dict) -> bool:
    if str(config.get("model_type", "")).lower() == "camelidae":
        return True
    remote = json.dumps(config.get("auto_map", "")) + json.dumps(config.get("architectures", ""))
    return "camelidae" in remote.lower()


def rope_base(config: dict) -> float:
    """The RoPE base the original modeling code uses (the Camelidae quirk included)."""
    if is_camelidae(config):
        return 10000.0
    return float(config.get("rope_theta", 10000.0))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class ReferenceModel:
    """Slow full-recompute forward of a HF-layout checkpoint; see the module docstring."""

    def __init__(self, config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.dtype = dtype
        self.w = {name: t.to(dtype) for name, t in state.items()}
        model_type = str(config["model_type"]).lower()
        if model_type not in _FAMILIES:
            raise NotImplementedError(f"reference: model_type {model_type!r}")
        self.family = _FAMILIES[model_type]
        if config.get("hidden_act", "silu") not in ("silu", "swish"):
            raise NotImplementedError("reference: only silu")
        if config.get("rope_scaling"):
            raise NotImplementedError("reference: rope_scaling not implemented")
        if self.family == "qwen2" and config.get("use_sliding_window", False):
            raise NotImplementedError("reference: Qwen2 sliding window (per-layer) not implemented")
        self.hidden = int(config["hidden_size"])
        self.num_layers = int(config["num_hidden_layers"])
        self.num_heads = int(config["num_attention_heads"])
        self.num_kv_heads = int(config.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(config.get("head_dim") or self.hidden // self.num_heads)
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.rope_base = rope_base(config)
        self.sliding_window = config.get("sliding_window") if self.family == "mistral" else None
        self.num_experts = int(config.get("num_experts") or 0)
        self.topk = int(config.get("topk") or 0)
        self.moe_scaling = float(config.get("moe_scaling", 1.0))
        # Qwen2 has q/k/v biases unconditionally; Llama only with attention_bias (then o_proj too).
        self.qkv_bias = self.family == "qwen2" or bool(config.get("attention_bias", False))
        self.o_bias = self.family == "llama" and bool(config.get("attention_bias", False))
        tied = bool(config.get("tie_word_embeddings", False))
        self.lm_head = self.w["model.embed_tokens.weight"] if tied else self.w["lm_head.weight"]

    @classmethod
    def from_dir(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "ReferenceModel":
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        return cls(config, read_state_dict(path), dtype)

    # -- pieces ---------------------------------------------------------------------------

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] (HF LlamaRotaryEmbedding, float32)."""
        inv_freq = 1.0 / (
            self.rope_base ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim)
        )
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Additive [Tq, Tk] mask: causal, plus the Mistral sliding window when configured."""
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.sliding_window:
            allowed &= k_pos[None, :] > q_pos[:, None] - int(self.sliding_window)
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        return mask.masked_fill(~allowed, torch.finfo(self.dtype).min)

    def _linear(self, x: torch.Tensor, name: str, bias: bool = False) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"] if bias else None)

    def _qkv(self, layer: int, x: torch.Tensor, positions: torch.Tensor):
        """Rotated q [Hq, T, D] and k, v [Hkv, T, D] of the new tokens."""
        p = f"model.layers.{layer}.self_attn."
        t = x.shape[0]
        q = self._linear(x, p + "q_proj", self.qkv_bias).view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = self._linear(x, p + "k_proj", self.qkv_bias).view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = self._linear(x, p + "v_proj", self.qkv_bias).view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        cos, sin = self._rope(positions)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _attend(self, layer: int, q, k, v, q_pos, k_pos) -> torch.Tensor:
        """Eager attention of q [Hq, Tq, D] over k, v [Hkv, Tk, D] -> o_proj output [Tq, H]."""
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=0)  # HF repeat_kv: head h uses kv head h // groups
        v = v.repeat_interleave(groups, dim=0)
        scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(self.head_dim)
        scores = scores + self._mask(q_pos, k_pos)[None]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(probs, v).transpose(0, 1).reshape(q.shape[1], self.num_heads * self.head_dim)
        return self._linear(o, f"model.layers.{layer}.self_attn.o_proj", self.o_bias)

    def _mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp."
        ffn = self._linear(F.silu(self._linear(x, p + "gate_proj")) * self._linear(x, p + "up_proj"), p + "down_proj")
        if not self.num_experts:
            return ffn
        # --- the authors' MoE adapter, literally ---
        a = p + "moe_adapter."
        router_logits = self._linear(x, a + "router")  # router input is x, not F
        weights, selected = torch.topk(router_logits, self.topk, dim=-1)
        weights = torch.softmax(weights, dim=-1)  # softmax over the k selected logits only
        flat_selected = selected.reshape(-1)  # [T*k]
        hidden = ffn.repeat_interleave(self.topk, dim=0)  # [T*k, H]
        out = torch.empty_like(hidden)
        for e in range(self.num_experts):
            chosen = flat_selected == e
            z = hidden[chosen]
            down = self._linear(z, a + f"experts.{e}.adapter_down")
            up = self._linear(F.gelu(down), a + f"experts.{e}.adapter_up")  # exact (erf) GELU
            out[chosen] = z + self.moe_scaling * up
        out = out.view(x.shape[0], self.topk, -1) * weights.unsqueeze(-1)
        return out.sum(dim=1)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = _rms_norm(h, self.w["model.norm.weight"], self.eps)
        return F.linear(h, self.lm_head).float()

    # -- public API ----------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] (float32) of a fresh sequence, full recompute, no cache."""
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        positions = torch.arange(ids.numel())
        h = F.embedding(ids, self.w["model.embed_tokens.weight"])
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}."
            x = _rms_norm(h, self.w[p + "input_layernorm.weight"], self.eps)
            q, k, v = self._qkv(layer, x, positions)
            h = h + self._attend(layer, q, k, v, positions, positions)
            x = _rms_norm(h, self.w[p + "post_attention_layernorm.weight"], self.eps)
            h = h + self._mlp(layer, x)
        return self._logits(h)

    @torch.no_grad()
    def decode_with_cache(self, prompt_ids: list[int], continuation_ids: list[int]) -> list[torch.Tensor]:
        """Prefill ``prompt_ids``, then feed ``continuation_ids`` one token at a time.

        Keeps its own simple cache (per layer, past K/V concatenated along time).  Returns
        ``len(continuation_ids) + 1`` float32 logit vectors [V]: the logits after the prompt's
        last token, then after each continuation token.
        """
        cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers
        outputs: list[torch.Tensor] = []
        start = 0
        for chunk in [list(prompt_ids)] + [[t] for t in continuation_ids]:
            ids = torch.tensor(chunk, dtype=torch.long)
            q_pos = torch.arange(start, start + len(chunk))
            h = F.embedding(ids, self.w["model.embed_tokens.weight"])
            for layer in range(self.num_layers):
                p = f"model.layers.{layer}."
                x = _rms_norm(h, self.w[p + "input_layernorm.weight"], self.eps)
                q, k, v = self._qkv(layer, x, q_pos)
                past = cache[layer]
                if past is not None:
                    k = torch.cat([past[0], k], dim=1)
                    v = torch.cat([past[1], v], dim=1)
                cache[layer] = (k, v)
                h = h + self._attend(layer, q, k, v, q_pos, torch.arange(k.shape[1]))
                x = _rms_norm(h, self.w[p + "post_attention_layernorm.weight"], self.eps)
                h = h + self._mlp(layer, x)
            outputs.append(self._logits(h[-1:])[0])
            start += len(chunk)
        return outputs
