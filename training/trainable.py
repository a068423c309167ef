"""A loaded serving model made trainable QLoRA-style, without touching the serving code.

:class:`TrainableModel` takes a :class:`PescForCausalLM` from pesc_serve's loader and

* freezes every base weight (embeddings, norms, head, attention, shared FFN), optionally
  swapping the base linears for bitsandbytes NF4 (``quantization="nf4"``);
* wraps q/k/v/o/gate/up/down with LoRA (per slice of the fused ``qkv_proj``/``gate_up_proj``);
* copies routers and adapters into float32 trainable :class:`ExpertBank` s (adapter
  up-projections kept UNSCALED, ``moe_scaling`` applied in the forward, as Camelidae trains);
* runs its own full-sequence causal forward over a right-padded ``[B, S]`` batch (reusing
  the serving layers' weights, norms, RoPE tables and routing maths), returning the final
  hidden states and, per layer, the router logits and top-k choices for the aux loss.

The serving model keeps no dropout and no training flags: adapter dropout (on the adapter
input) lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pesc_serve.layers.pesc_mlp import ExpertSet, SharedFFN
from pesc_serve.layers.quant import nf4_linear
from pesc_serve.layers.rotary import apply_rotary
from pesc_serve.models.decoder import Attention, PescForCausalLM
from training.lora import LoraConfig, LoRALinear, Slice

QUANTIZATION_CHOICES = ("none", "nf4")


@dataclass(frozen=True)
class TrainableConfig:
    """What is trained and how the frozen base is held."""

    lora: LoraConfig | None = field(default_factory=LoraConfig)
    adapter_dropout: float = 0.1
    quantization: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {self.quantization!r}")
        if not 0 <= self.adapter_dropout < 1:
            raise ValueError(f"--adapter-dropout must be in [0, 1), got {self.adapter_dropout}")


@dataclass
class ForwardOutput:
    """Final hidden states [B, S, H] and per-layer routing ([B, S, E] fp32 logits, [B, S, k] ids)."""

    hidden: torch.Tensor
    router_logits: list[torch.Tensor]
    router_topk: list[torch.Tensor]


def route_with_logits(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 router logits [.., E], top-k weights (softmax over the k kept logits) and ids.

    Same maths as ``pesc_serve.layers.pesc_mlp.route``, but the logits are returned too.
    """
    logits = F.linear(x.float(), router.float())
    top_logits, top_idx = torch.topk(logits, k, dim=-1)
    return logits, torch.softmax(top_logits, dim=-1), top_idx


def adapter_mix(f: torch.Tensor, down: torch.Tensor, up: torch.Tensor, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_j p_j U_j GELU(D_j f) for f [T, H], down [E, r, H], up [E, H, r], p/idx [T, k].

    The serving model's dense-stacked dispatch written out here (two GEMMs over all experts,
    unselected ones weighted 0): autograd-friendly and independent of the serving kernels'
    signatures, which change with serving optimisations; the parity test against the
    served model keeps the two in step.
    """
    num_experts, r, hidden = down.shape
    t = f.shape[0]
    z = F.gelu(F.linear(f, down.reshape(num_experts * r, hidden))).view(t, num_experts, r)  # [T, E, r]
    weights = torch.zeros(t, num_experts, dtype=f.dtype, device=f.device).scatter(1, idx, p)
    z = (z * weights.unsqueeze(-1)).view(t, num_experts * r)
    return F.linear(z, up.permute(1, 0, 2).reshape(hidden, num_experts * r))  # [T, H]


class ExpertBank(nn.Module):
    """One layer's router and stacked adapters, float32 and trainable."""

    def __init__(self, experts: ExpertSet, adapter_dropout: float) -> None:
        super().__init__()
        moe_scaling = experts.moe_scaling
        if moe_scaling == 0:
            raise ValueError("moe_scaling is 0: the adapters can never change the output")
        self.topk = experts.topk
        self.moe_scaling = moe_scaling
        self.router = nn.Parameter(experts.router.detach().float().clone())  # [E, H]
        self.adapter_down = nn.Parameter(experts.down.detach().float().clone())  # [E, r, H]
        # The loader folded moe_scaling into U; train the unscaled U as the authors do.
        self.adapter_up = nn.Parameter(experts.up.detach().float().clone() / moe_scaling)  # [E, H, r]
        self.dropout = nn.Dropout(adapter_dropout)

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: FFN input, f: shared FFN output, both [B, S, H] -> (y, router logits, top-k ids)."""
        logits, p, idx = route_with_logits(x, self.router, self.topk)
        dt = f.dtype
        out = adapter_mix(
            self.dropout(f).reshape(-1, f.shape[-1]),  # adapter dropout on the adapter input only
            self.adapter_down.to(dt),
            (self.adapter_up * self.moe_scaling).to(dt),
            p.to(dt).reshape(-1, self.topk),
            idx.reshape(-1, self.topk),
        )
        return f + out.view(f.shape), logits, idx


def _lora_wrap(linear: nn.Module, in_features: int, out_features: int, slices: list[Slice], cfg: LoraConfig,
               gen: torch.Generator) -> nn.Module:
    wanted = [s for s in slices if s.name in cfg.targets]
    return LoRALinear(linear, in_features, out_features, wanted, cfg, gen) if wanted else linear


class TrainableModel(nn.Module):
    """The wrapper described in the module docstring; ``model`` is modified in place."""

    def __init__(self, model: PescForCausalLM, cfg: TrainableConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        mc = model.config
        self.config = mc
        for p in model.parameters():
            p.requires_grad_(False)
        dtype = model.embed_tokens.weight.dtype
        gen = torch.Generator().manual_seed(cfg.seed)
        banks = []
        for layer in model.layers:
            attn: Attention = layer.self_attn
            ffn: SharedFFN = layer.mlp.ffn
            if cfg.quantization == "nf4":
                attn.qkv_proj = nf4_linear(attn.qkv_proj, dtype)
                attn.o_proj = nf4_linear(attn.o_proj, dtype)
                ffn.gate_up_proj = nf4_linear(ffn.gate_up_proj, dtype)
                ffn.down_proj = nf4_linear(ffn.down_proj, dtype)
            if cfg.lora is not None:
                h, q, kv, inter = mc.hidden_size, mc.q_size, mc.kv_size, mc.intermediate_size
                qkv = [Slice("q_proj", 0, q), Slice("k_proj", q, q + kv), Slice("v_proj", q + kv, q + 2 * kv)]
                attn.qkv_proj = _lora_wrap(attn.qkv_proj, h, q + 2 * kv, qkv, cfg.lora, gen)
                attn.o_proj = _lora_wrap(attn.o_proj, q, h, [Slice("o_proj", 0, h)], cfg.lora, gen)
                gate_up = [Slice("gate_proj", 0, inter), Slice("up_proj", inter, 2 * inter)]
                ffn.gate_up_proj = _lora_wrap(ffn.gate_up_proj, h, 2 * inter, gate_up, cfg.lora, gen)
                ffn.down_proj = _lora_wrap(ffn.down_proj, inter, h, [Slice("down_proj", 0, h)], cfg.lora, gen)
            if 0 in layer.mlp.experts:  # the loaded model's own experts (slot 0) become trainable
                banks.append(ExpertBank(layer.mlp.experts[0], cfg.adapter_dropout))
        self.banks = nn.ModuleList(banks)

    @property
    def has_experts(self) -> bool:
        return len(self.banks) > 0

    def lora_modules(self) -> list[tuple[int, str, LoRALinear]]:
        """(layer, HF module prefix inside the layer, module) for every LoRA wrapper."""
        out = []
        for i, layer in enumerate(self.model.layers):
            ffn = layer.mlp.ffn
            for prefix, mod in (("self_attn", layer.self_attn.qkv_proj), ("self_attn", layer.self_attn.o_proj),
                                ("mlp", ffn.gate_up_proj), ("mlp", ffn.down_proj)):
                if isinstance(mod, LoRALinear):
                    out.append((i, prefix, mod))
        return out

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors (for checkpoints), keyed by module path."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.trainable_parameters())
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"checkpoint does not match this model (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def forward(self, input_ids: torch.Tensor) -> ForwardOutput:
        """input_ids: [B, S], right-padded (padding only after a row's last real token).

        Causal attention alone then never lets a real token see padding, so no extra mask.
        """
        m = self.model
        s = input_ids.shape[1]
        positions = torch.arange(s, device=input_ids.device)
        mask = self._window_mask(s, input_ids.device)
        h = m.embed_tokens(input_ids)
        cos, sin = m.rotary.lookup(positions, h.dtype)  # [S, 1, D]
        rope = (cos.unsqueeze(0), sin.unsqueeze(0))  # broadcast over the batch: [1, S, 1, D]
        logits_all, topk_all = [], []
        for i, layer in enumerate(m.layers):
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), rope, mask)
            x = layer.post_attention_layernorm(h)
            f = layer.mlp.ffn(x)
            if self.has_experts:
                f, logits, idx = self.banks[i](x, f)
                logits_all.append(logits)
                topk_all.append(idx)
            h = h + f
        return ForwardOutput(m.norm(h), logits_all, topk_all)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    def _window_mask(self, s: int, device: torch.device) -> torch.Tensor | None:
        """Causal + sliding-window boolean mask when a window is shorter than the batch."""
        window = self.config.sliding_window
        if not window or s <= window:
            return None
        i = torch.arange(s, device=device)
        return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)

    @staticmethod
    def _attention(attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = attn.lora["qkv_proj"](attn.qkv_proj(x), x)  # a loaded delta's own LoRA, if any (frozen)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = apply_rotary(q.reshape(b, s, attn.num_heads, attn.head_dim), *rope).transpose(1, 2)
        k = apply_rotary(k.reshape(b, s, attn.num_kv_heads, attn.head_dim), *rope).transpose(1, 2)
        v = v.reshape(b, s, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scale,
            enable_gqa=attn.num_heads != attn.num_kv_heads,
        )
        o = o.transpose(1, 2).reshape(b, s, attn.q_size)
        return attn.lora["o_proj"](attn.o_proj(o), o)
