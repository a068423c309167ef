"""The AVX512-VNNI int4/int8 kernels (csrc/low_bit_gemm.h) against the weights they encode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pesc_serve.layers.quant import AtenInt4Packing, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from pesc_serve.kernels.build import load_extension
from pesc_serve.kernels.cpu_kernels import install_packed_kernels


@pytest.fixture(scope="module")
def ext():
    ext = load_extension()
    if not ext.have_vnni():
        pytest.skip("no AVX512-VNNI on this CPU")
    return ext


def _dequantized(q: nn.Module) -> torch.Tensor:
    """The float weight a quantized layer stands for, from its unpacked buffers."""
    if isinstance(q, Int8WeightOnlyLinear):
        return q.weight.float() * q.scale.float()[:, None]
    nib = torch.stack([q.qweight & 15, q.qweight >> 4], dim=-1).view(q.out_features, q.in_features).float()
    scale, minimum = (t.t().repeat_interleave(q.group_size, 1) for t in q.scale_min.float().unbind(-1))
    return nib * scale + minimum


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", [Int4WeightOnlyLinear, Int8WeightOnlyLinear])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (96, 1536), (1008, 160)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_kernel_matches_the_dequantized_weights(ext, kind, n, k, rows):
    """Exact but for the activations' int8 rounding (about 0.5% of the output's norm); rows
    not a multiple of the 4-row tile take the tail paths."""
    torch.manual_seed(n + k + rows)
    q = kind(nn.Linear(k, n, bias=False), torch.bfloat16)
    w = _dequantized(q)
    packed = ext.PackedInt4(q.qweight, q.scale_min) if kind is Int4WeightOnlyLinear else ext.PackedInt8(q.weight, q.scale)
    run = ext.int4_linear if kind is Int4WeightOnlyLinear else ext.int8_linear
    x = torch.randn(rows, k) * torch.linspace(0.1, 3, k)  # uneven magnitudes across groups
    got = run(x, packed)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert _rel(got, x @ w.t()) < 1.2e-2
    assert torch.equal(run(torch.zeros(rows, k), packed), torch.zeros(rows, n))  # all-zero groups: no NaNs


def test_int4_kernel_is_exact_on_integer_activations(ext):
    """Activations already on the int8 grid of every group lose nothing: the integer dot
    products and the min correction are exact."""
    torch.manual_seed(3)
    q = Int4WeightOnlyLinear(nn.Linear(64, 32, bias=False), torch.bfloat16)
    x = torch.randint(-127, 128, (3, 64)).float()
    x[:, ::32] = 127  # each group's largest magnitude is 127: its scale is exactly 1
    got = ext.int4_linear(x, ext.PackedInt4(q.qweight, q.scale_min))
    assert torch.allclose(got, x @ _dequantized(q).t(), rtol=1e-5, atol=1e-3)


def test_install_repacks_in_place_and_keeps_unfit_shapes(ext):
    torch.manual_seed(4)
    root = nn.Module()
    root.a = Int4WeightOnlyLinear(nn.Linear(64, 48), torch.bfloat16)
    root.b = Int8WeightOnlyLinear(nn.Linear(64, 48), torch.bfloat16)
    root.odd = Int8WeightOnlyLinear(nn.Linear(64, 40), torch.bfloat16)  # 40 rows: not whole 16-row blocks
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = {name: x @ _dequantized(m).t() + m.bias for name, m in root.named_children()}
        assert install_packed_kernels(root, ext) == 2
        assert isinstance(root.a.packed, ext.PackedInt4) and root.a.qweight is root.a.packed.data
        assert isinstance(root.b.packed, ext.PackedInt8) and root.b.weight is root.b.packed.data
        assert root.odd.packed is None
        for name, m in root.named_children():
            assert _rel(m(x), expected[name]) < 2e-2, name
        assert install_packed_kernels(root, ext) == 0  # idempotent


def test_an_int4_layer_packed_for_one_kernel_refuses_the_other(ext):
    q = Int4WeightOnlyLinear(nn.Linear(64, 48), torch.bfloat16)
    aten = copy.deepcopy(q)
    root = nn.Module()
    root.q = q
    install_packed_kernels(root, ext)
    with pytest.raises(RuntimeError, match="PackedInt4"):
        q.aten_packing()
    assert isinstance(aten.aten_packing(), AtenInt4Packing)
    root.aten = aten
    assert install_packed_kernels(root, ext) == 0  # already packed for ATen: left alone
