"""A PESC model freshly crafted from a dense one (adapter up-projections zero) IS the dense model.

DESIGN.md section 1: with ``U_e = 0`` every expert equals the shared FFN, so the crafted
model's logits must equal its dense base's, whatever the routers and down-projections say
and whichever dispatch strategy runs the adapters.
"""

from __future__ import annotations

import json

import pytest
import torch

from pesc_serve.config import DISPATCH_CHOICES, LoadConfig, ModelConfig
from pesc_serve.layers.attention import AttentionMetadata, PrefillChunk
from pesc_serve.layers.pesc_mlp import DISPATCHES
from pesc_serve.models.loader import load_model
from pesc_serve.registry import resolve_model
from tests.reference.pesc_reference import ReferenceModel

TOL = 1e-6


def _load(path, dispatch: str = "auto"):
    forced = dispatch not in DISPATCH_CHOICES  # see test_parity.test_load_config_accepts_every_dispatch
    load = LoadConfig(model=str(path), dtype="float32", device="cpu", dispatch="auto" if forced else dispatch)
    lm = load_model(resolve_model(str(path)), load)
    if forced and lm.config.is_pesc:
        for layer in lm.model.layers:
            layer.mlp.dispatch = dispatch
    return lm


@torch.no_grad()
def _prefill_then_decode(lm, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits of the prompt (prefill) and of each continuation token (decode), stacked [T, V]."""
    m, cfg = lm.model, lm.config
    kv = torch.zeros(cfg.num_layers, 2, 64, cfg.num_kv_heads, cfg.head_dim)
    t = len(prompt)
    meta = AttentionMetadata(slot_mapping=torch.arange(t), prefills=[PrefillChunk(0, t)])
    out = [m.compute_logits(m(torch.tensor(prompt), torch.arange(t), kv, meta))]
    for i, token in enumerate(continuation):
        pos = t + i
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([pos]), num_decode_tokens=1, decode_slots=torch.arange(pos + 1)[None]
        )
        out.append(m.compute_logits(m(torch.tensor([token]), torch.tensor([pos]), kv, meta)))
    return torch.cat(out)


def _tokens(vocab: int, n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_crafted_config_is_pesc_and_keeps_rope_theta(crafted_pair):
    dense_dir, pesc_dir = crafted_pair
    dense = load_model(resolve_model(str(dense_dir)), LoadConfig(model=str(dense_dir), dtype="float32", device="cpu"))
    pesc = _load(pesc_dir)
    assert not dense.config.is_pesc and pesc.config.is_pesc
    # model_type llama without Camelidae remote code: rope_theta from config.json is honoured.
    assert pesc.config.rope_theta == dense.config.rope_theta == 500000.0


@pytest.mark.parametrize("dispatch", sorted(DISPATCHES) + ["auto"])
def test_crafted_equals_dense_base(crafted_pair, dispatch):
    dense_dir, pesc_dir = crafted_pair
    dense = _load(dense_dir)
    pesc = _load(pesc_dir, dispatch)
    # Sanity: the crafted model really routes (nonzero routers and down-projections).
    experts = pesc.model.layers[0].mlp.experts[0]
    assert experts.router.abs().sum() > 0 and experts.down.abs().sum() > 0
    assert experts.up.abs().sum() == 0
    tokens = _tokens(dense.config.vocab_size, 20)
    a = _prefill_then_decode(dense, tokens[:12], tokens[12:])
    b = _prefill_then_decode(pesc, tokens[:12], tokens[12:])
    diff = (a - b).abs().max().item()
    assert diff < TOL, f"crafted PESC ({dispatch}) differs from its dense base by {diff:.3g}"


def test_crafted_equals_dense_in_reference(crafted_pair):
    """The fixture itself is right: the independent reference agrees the two are identical."""
    dense_dir, pesc_dir = crafted_pair
    dense, pesc = ReferenceModel.from_dir(dense_dir), ReferenceModel.from_dir(pesc_dir)
    assert pesc.num_experts == 4 and dense.num_experts == 0
    tokens = _tokens(dense.w["model.embed_tokens.weight"].shape[0], 16, seed=1)
    diff = (dense.forward(tokens) - pesc.forward(tokens)).abs().max().item()
    # The authors' way sums p_j * F over the k copies and the p_j sum to 1 only up to
    # rounding, so here the match is to float32 rounding, not bit-exact as in our MLP.
    assert diff < 1e-5


def test_model_config_of_crafted_pair(crafted_pair):
    _, pesc_dir = crafted_pair
    cfg = ModelConfig.from_hf_config(json.loads((pesc_dir / "config.json").read_text()))
    assert (cfg.num_experts, cfg.topk, cfg.adapter_dim, cfg.moe_scaling) == (4, 2, 8, 0.25)
