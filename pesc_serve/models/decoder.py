"""Llama-family decoder (Llama, Mistral, Qwen2 bases) written for serving.

Inputs are a flat batch of tokens with their absolute positions; the KV cache, the
attention metadata and which delta each token runs come in as arguments, so the module
holds weights only.  The base's weights are parameters; the deltas' experts and LoRA pairs
sit in per-slot tables beside them (deltas/table.py fills them).

Parameter names (what the loader produces):
    embed_tokens.weight, norm.weight, lm_head.weight (absent when tied)
    layers.{l}.input_layernorm.weight, layers.{l}.post_attention_layernorm.weight
    layers.{l}.self_attn.qkv_proj.{weight,bias}, layers.{l}.self_attn.o_proj.weight
    layers.{l}.mlp.ffn.gate_up_proj.weight, layers.{l}.mlp.ffn.down_proj.weight
"""

from __future__ import annotations

import torch
from torch import nn

from pesc_serve.config import ModelConfig
from pesc_serve.deltas.batch import DeltaBatch
from pesc_serve.layers.attention import AttentionMetadata, paged_attention
from pesc_serve.layers.lora import SlotLoRA
from pesc_serve.layers.pesc_mlp import PescMLP
from pesc_serve.layers.rms_norm import RMSNorm
from pesc_serve.layers.rotary import RotaryEmbedding, apply_rotary


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.window = cfg.sliding_window
        # The C++ prefill attention over the KV blocks (kernels/cpu_kernels.py installs it on CPU).
        self.prefill_kernel = None
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.lora = nn.ModuleDict({"qkv_proj": SlotLoRA(), "o_proj": SlotLoRA()})

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor, meta: AttentionMetadata,
        deltas: DeltaBatch | None = None,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.lora["qkv_proj"](self.qkv_proj(x), x, deltas)
        # q and k heads are rotated in one go: [T, Hq + Hkv, D]
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), *rope)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale, self.prefill_kernel, self.window).reshape(t, self.q_size)
        return self.lora["o_proj"](self.o_proj(o), o, deltas)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dispatch: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = PescMLP(cfg.hidden_size, cfg.intermediate_size, dispatch)

    def forward(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor, meta: AttentionMetadata,
        deltas: DeltaBatch | None = None,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, kv_cache, meta, deltas)
        return h + self.mlp(self.post_attention_layernorm(h), deltas)


class PescForCausalLM(nn.Module):
    """Decoder + LM head. ``forward`` returns hidden states; ``compute_logits`` the logits."""

    def __init__(self, cfg: ModelConfig, dispatch: str = "auto", max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        positions = max_positions or cfg.max_position_embeddings
        self.rotary = RotaryEmbedding(cfg.head_dim, positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dispatch) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        meta: AttentionMetadata,
        deltas: DeltaBatch | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: [L, 2, S, Hkv, D] -> final hidden states [T, H].

        ``deltas`` says which delta slot each token runs (None: slot 0 for all)."""
        h = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, kv_caches[i], meta, deltas)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return torch.nn.functional.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()


def lora_site(model: PescForCausalLM, module_name: str) -> SlotLoRA:
    """The per-slot LoRA holder beside the linear layer called ``module_name``
    (e.g. ``layers.3.self_attn.qkv_proj``)."""
    parent, _, leaf = module_name.rpartition(".")
    holder = model.get_submodule(parent)
    lora = getattr(holder, "lora", None)
    if not isinstance(lora, nn.ModuleDict) or leaf not in lora:
        raise KeyError(f"{module_name} takes no LoRA (only the attention and FFN projections do)")
    return lora[leaf]
