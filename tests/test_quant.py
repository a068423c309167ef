"""Weight-only quantization: kernels match the float layer, hybrid dispatch, the load-time plan."""

from __future__ import annotations

import pytest
import torch

from pesc_serve.config import LoadConfig
from pesc_serve.layers.quant import (
    AtenInt4Packing,
    HybridLinear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    nf4_linear,
    quantize_modules,
)
from pesc_serve.kernels.cpu_features import CpuFeatures
from pesc_serve.kernels.plan import ATEN_LOW_BIT_MAX_ROWS, choose_plan
from pesc_serve.models.loader import QuantPlan, load_model, resolve_quantization
from pesc_serve.registry import resolve_model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(128, 96, bias=True).to(torch.bfloat16)


@pytest.mark.parametrize("make,tol", [(Int8WeightOnlyLinear, 0.02), (Int4WeightOnlyLinear, 0.12),
                                      (lambda l: nf4_linear(l, torch.bfloat16), 0.15)])
def test_quantized_linear_close_to_float(linear, make, tol):
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    q = make(linear)
    with torch.no_grad():
        assert _rel_err(q(x), linear(x)) < tol


def test_int4_reproduces_weights_already_on_a_4bit_grid():
    """A Q4_1-style block (scale * q + min, q spanning 0..15, scale and min float16 as in a
    GGUF file) survives int4 exactly."""
    torch.manual_seed(1)
    q = torch.randint(0, 16, (64, 64)).float()
    q[:, ::32] = 0
    q[:, 1::32] = 15
    scale, minimum = torch.tensor(0.01).half().float(), torch.tensor(-0.07).half().float()
    w = q * scale + minimum
    lin = torch.nn.Linear(64, 64, bias=False)
    lin.weight.data = w
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(Int4WeightOnlyLinear(lin)(x), lin(x), atol=1e-4)


def test_int4_falls_back_to_int8_for_shapes_its_kernel_cannot_pack():
    torch.manual_seed(0)
    root = torch.nn.Module()
    root.fits, root.odd_out, root.odd_in = (torch.nn.Linear(64, 48), torch.nn.Linear(64, 100), torch.nn.Linear(33, 48))
    assert quantize_modules(root, ("fits", "odd_out", "odd_in"), "int4", torch.bfloat16) == 3
    assert isinstance(root.fits, Int4WeightOnlyLinear)
    assert isinstance(root.odd_out, Int8WeightOnlyLinear) and isinstance(root.odd_in, Int8WeightOnlyLinear)
    x = torch.randn(2, 33)
    with torch.no_grad():
        assert root.odd_in(x).shape == (2, 48)


def test_int4_keeps_nibbles_until_a_kernel_packs_them():
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 48, bias=False)
    q = Int4WeightOnlyLinear(lin, torch.bfloat16)
    assert q.qweight.shape == (48, 32) and q.qweight.dtype == torch.uint8 and q.packed is None
    deq = _dequantize_int4(q)
    assert _rel_err(deq, lin.weight.detach()) < 0.1
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = q(x)  # first use packs for ATen's kernel, in place of the nibbles
    assert isinstance(q.packed, AtenInt4Packing) and q.qweight is q.packed.data
    assert _rel_err(y, x @ deq.t()) < 1e-2


def _dequantize_int4(q: Int4WeightOnlyLinear) -> torch.Tensor:
    """q * scale + min from the module's own buffers."""
    nib = torch.stack([q.qweight & 15, q.qweight >> 4], dim=-1).view(q.out_features, q.in_features).float()
    scale, minimum = q.scale_min.float().unbind(-1)  # [G, N] each
    g = q.group_size
    return nib * scale.t().repeat_interleave(g, 1) + minimum.t().repeat_interleave(g, 1)


def test_hybrid_uses_quantized_weights_only_for_small_batches(linear):
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return torch.zeros(x.shape[0], 96, dtype=x.dtype)

    h = HybridLinear(linear, Spy(), max_rows=4)
    h(torch.randn(4, 128, dtype=torch.bfloat16))
    x = torch.randn(9, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(h(x), linear(x))
    assert calls == [4]


def test_quantize_modules_swaps_by_name(linear):
    root = torch.nn.Module()
    root.keep = torch.nn.Linear(8, 8)
    root.qkv_proj = linear
    assert quantize_modules(root, ("qkv_proj",), "int8", torch.bfloat16, hybrid_max_rows=2) == 1
    assert isinstance(root.qkv_proj, HybridLinear) and isinstance(root.keep, torch.nn.Linear)


def test_auto_keeps_what_the_checkpoint_is():
    """Quantized weights (a GGUF's blocks) stay low-bit on CPU; float checkpoints keep their
    precision; GPUs keep the model's dtype.  ``int4`` asks for the low-bit plan anywhere on CPU."""
    for dtype in (torch.float32, torch.bfloat16):
        cpu = resolve_quantization("auto", torch.device("cpu"), dtype, arrives_quantized=True)
        assert cpu.ffn == cpu.attention == "int4" and cpu.lm_head == "int8"
        assert cpu.hybrid_max_rows == ATEN_LOW_BIT_MAX_ROWS  # no kernel plan: ATen's kernels, dense bf16 for big batches
        assert cpu.kernel_dtype == torch.bfloat16
        plan = choose_plan(CpuFeatures(avx512=True, avx512_vnni=True, avx512_bf16=True), None)
        vnni = resolve_quantization("auto", torch.device("cpu"), dtype, plan, arrives_quantized=True)
        assert vnni.ffn == vnni.attention == "int4" and vnni.hybrid_max_rows is None  # no dense copies
        assert resolve_quantization("auto", torch.device("cpu"), dtype, arrives_quantized=False) == QuantPlan()
        assert resolve_quantization("int4", torch.device("cpu"), dtype, plan, arrives_quantized=False) == vnni
    assert resolve_quantization("auto", torch.device("cuda"), torch.bfloat16) == QuantPlan()
    assert resolve_quantization("nf4", torch.device("cpu"), torch.bfloat16) == QuantPlan(ffn="nf4")
    int8 = resolve_quantization("int8", torch.device("cpu"), torch.float32)
    assert int8.ffn == int8.attention == int8.lm_head == "int8" and int8.kernel_dtype == torch.bfloat16


def test_a_float_checkpoint_keeps_its_weights_under_auto(tiny_checkpoint_factory):
    path = str(tiny_checkpoint_factory("qwen2idae"))
    lm = load_model(resolve_model(path), LoadConfig(model=path, dtype="auto", device="cpu", quantization="auto"))
    assert lm.quantization == QuantPlan()
    linears = [m for name, m in lm.model.named_modules() if name.endswith("_proj") and ".lora." not in name]
    assert len(linears) == 4 * lm.config.num_layers and all(type(m) is torch.nn.Linear for m in linears)


@pytest.mark.parametrize("method", ["int8", "nf4", "int4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_quantized_model_logits_stay_close(tiny_checkpoint_factory, method, dtype):
    path = str(tiny_checkpoint_factory("camelidae"))
    ref = load_model(resolve_model(path), LoadConfig(model=path, dtype=dtype, device="cpu"))
    q = load_model(resolve_model(path), LoadConfig(model=path, dtype=dtype, device="cpu", quantization=method))
    from pesc_serve.layers.attention import AttentionMetadata, PrefillChunk

    ids = torch.tensor([5, 9, 33, 70, 11, 8])
    cfg = ref.config

    def logits(lm, rows):
        kv = torch.zeros(cfg.num_layers, 2, 32, cfg.num_kv_heads, cfg.head_dim, dtype=lm.dtype)
        t = ids[:rows]
        meta = AttentionMetadata(slot_mapping=torch.arange(rows), prefills=[PrefillChunk(0, rows)])
        with torch.inference_mode():
            return lm.model.compute_logits(lm.model(t, torch.arange(rows), kv, meta))

    if method == "int4":  # int4 on random weights (below the threshold, if dense bf16 serves above it)
        assert _rel_err(logits(q, 2), logits(ref, 2)) < 0.35
        dense = q.quantization.hybrid_max_rows is not None and 6 > q.quantization.hybrid_max_rows
        assert _rel_err(logits(q, 6), logits(ref, 6)) < (0.05 if dense else 0.35)
    else:
        for rows in (2, 6):
            assert _rel_err(logits(q, rows), logits(ref, rows)) < 0.15

