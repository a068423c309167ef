"""Llama-family decoder (Llama, Mistral, Qwen2 bases) written for serving.

Inputs are a flat batch of tokens with their absolute positions; the KV cache and the
attention metadata come in as arguments, so the module holds weights only.  The MLP is the
PESC MLP when the config has experts, else the plain shared FFN.

Parameter names (what the loader produces):
    embed_tokens.weight, norm.weight, lm_head.weight (absent when tied)
    layers.{l}.input_layernorm.weight, layers.{l}.post_attention_layernorm.weight
    layers.{l}.self_attn.qkv_proj.{weight,bias}, layers.{l}.self_attn.o_proj.weight
    layers.{l}.mlp[.ffn].gate_up_proj.weight, layers.{l}.mlp[.ffn].down_proj.weight
    layers.{l}.mlp.router.weight [E, H], .adapter_down [E, r, H], .adapter_up [E, H, r]
"""

from __future__ import annotations

import torch
from torch import nn

from pesc_serve.config import ModelConfig
from pesc_serve.layers.attention import AttentionMetadata, paged_attention
from pesc_serve.layers.pesc_mlp import PescMLP, SharedFFN
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
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k heads are rotated in one go: [T, Hq + Hkv, D]
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), *rope)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dispatch: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_pesc:
            self.mlp: nn.Module = PescMLP(
                cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.topk, cfg.adapter_dim, dispatch
            )
        else:
            self.mlp = SharedFFN(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


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
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: [L, 2, S, Hkv, D] -> final hidden states [T, H]."""
        h = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, kv_caches[i], meta)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return torch.nn.functional.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()


class ExpertLoad:
    """Cumulative tokens routed to each (layer, expert): the router-load metric.

    Layers only remember their last choices; one scatter per engine step adds them up, so
    the decode path pays nothing per layer.
    """

    def __init__(self, model: PescForCausalLM) -> None:
        cfg = model.config
        self.layers = [layer.mlp for layer in model.layers]
        device = model.embed_tokens.weight.device
        self.counts = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long, device=device)
        self._offsets = (torch.arange(cfg.num_layers, device=device) * cfg.num_experts).view(-1, 1, 1)

    def record(self, choices: torch.Tensor | None = None) -> None:
        """Add one step's choices: those given as [L, T, k] (the C++ decode step's) and those
        the layers remember from a PyTorch forward in the same step."""
        if choices is not None:
            self._add(choices)
        per_layer = [mlp.last_topk for mlp in self.layers]
        if all(c is not None for c in per_layer):
            self._add(torch.stack(per_layer))
        for mlp in self.layers:
            object.__setattr__(mlp, "last_topk", None)  # plain attribute: skip nn.Module's hook

    def _add(self, choices: torch.Tensor) -> None:
        flat = (choices + self._offsets).reshape(-1)  # [L, T, k] -> global expert ids
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))


def expert_load(model: PescForCausalLM) -> ExpertLoad | None:
    return ExpertLoad(model) if model.config.is_pesc else None
