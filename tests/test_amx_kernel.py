"""The int4 and int8 GEMMs on AMX int8 tiles (csrc/amx_gemm.h).

Every host runs the kernel with its tile instructions emulated (the blocking, the 16-row
padding, the B-tile unpacking and the per-group scales); hosts where Linux grants AMX run the
instructions themselves.  Both must give the AVX512-VNNI kernel's output bit for bit: the same
integer dot products and the same float operations in the same order.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pesc_serve.kernels.build import load_extension
from pesc_serve.kernels.cpu_features import request_amx_permission
from pesc_serve.kernels.cpu_kernels import RowsSwitch, install_packed_kernels
from pesc_serve.layers.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear


@pytest.fixture(scope="module")
def ext():
    ext = load_extension()
    if not (ext.have_vnni() and ext.have_amx_int4()):
        pytest.skip("no AVX512-VNNI on this CPU (neither int4 kernel is built)")
    return ext


@pytest.fixture(scope="module")
def amx(ext):
    request_amx_permission()
    if not ext.amx_ready():
        pytest.skip("this host has no AMX-INT8 tiles, or Linux did not grant them")
    return ext


KINDS = ("int4", "int8", "int8-groups")  # Q4_1 blocks; int8 with per-row scales; Q8_0 blocks (the LM head)


def _layer(n: int, k: int, seed: int, ext, kind: str = "int4") -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    if kind == "int4":
        q = Int4WeightOnlyLinear(linear, torch.bfloat16)
        return q, ext.PackedInt4(q.qweight, q.scale_min)
    if kind == "int8":
        q = Int8WeightOnlyLinear(linear, torch.bfloat16)
    else:
        scale = torch.rand(n, k // 32) * 0.01 + 1e-3
        q = Int8WeightOnlyLinear.from_blocks(torch.randint(-127, 128, (n, k), dtype=torch.int8), scale.half(),
                                             torch.bfloat16)
    return q, ext.PackedInt8(q.weight, q.scale)


def _kernels(ext, kind: str, emulated: bool) -> tuple:
    """(the VNNI kernel, its AMX twin) for ``kind``."""
    bits = "int4" if kind == "int4" else "int8"
    return getattr(ext, f"{bits}_linear"), getattr(ext, f"{bits}_linear_amx{'_emulated' if emulated else ''}")


def _x(rows: int, k: int) -> torch.Tensor:
    return torch.randn(rows, k) * torch.linspace(0.1, 3, k)  # uneven magnitudes across groups


# (n, k, rows): one row, a tile's tail, exact tiles, odd shapes; 2,048 rows on a small weight
# (the emulation is scalar).
SHAPES = [(16, 32, 1), (48, 64, 5), (48, 64, 16), (96, 1536, 17), (1008, 160, 33), (64, 576, 100), (32, 64, 2048)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "k", "rows"), SHAPES)
def test_the_emulated_tiles_give_the_vnni_kernels_numbers(ext, kind, n, k, rows):
    _, packed = _layer(n, k, n + k + rows, ext, kind)
    vnni, tiles = _kernels(ext, kind, emulated=True)
    x = _x(rows, k)
    got = tiles(x, packed)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert torch.equal(got, vnni(x, packed))
    assert torch.equal(tiles(torch.zeros(rows, k), packed), torch.zeros(rows, n))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "k", "rows"), SHAPES + [(3072, 576, 512), (576, 1536, 2048)])
def test_the_amx_tiles_give_the_vnni_kernels_numbers(amx, kind, n, k, rows):
    _, packed = _layer(n, k, n + k + rows, amx, kind)
    vnni, tiles = _kernels(amx, kind, emulated=False)
    x = _x(rows, k)
    assert torch.equal(tiles(x, packed), vnni(x, packed))


def test_without_the_tiles_the_amx_kernel_refuses_instead_of_faulting(ext):
    if ext.amx_ready():
        pytest.skip("this host has AMX tiles granted")
    _, packed = _layer(16, 32, 0, ext)
    with pytest.raises(RuntimeError, match="AMX"):
        ext.int4_linear_amx(torch.randn(4, 32), packed)
    _, packed = _layer(16, 32, 0, ext, "int8")
    with pytest.raises(RuntimeError, match="AMX"):
        ext.int8_linear_amx(torch.randn(4, 32), packed)


class _TiledExt:
    """The extension with its AMX kernel emulated and the tiles reported granted: the install
    path on a host without AMX."""

    def __init__(self, ext) -> None:
        self._ext = ext
        self.int4_linear_amx = ext.int4_linear_amx_emulated
        self.int8_linear_amx = ext.int8_linear_amx_emulated

    def amx_ready(self) -> bool:
        return True

    def __getattr__(self, name: str):
        return getattr(self._ext, name)


def test_installed_low_bit_layers_switch_to_the_tiles_from_the_plans_row_count(ext):
    root = nn.Module()
    root.a, _ = _layer(48, 64, 1, ext)
    root.b, _ = _layer(48, 64, 1, ext, "int8-groups")
    tiled = _TiledExt(ext)
    assert install_packed_kernels(root, tiled, amx_from=33) == 2
    assert isinstance(root.b._packed_run, RowsSwitch) and root.b._packed_run.large is tiled.int8_linear_amx
    run = root.a._packed_run
    assert isinstance(run, RowsSwitch) and run.rows == 33 and run.large is tiled.int4_linear_amx
    calls = []
    run.large = lambda x, p: calls.append(x.shape[0]) or ext.int4_linear_amx_emulated(x, p)
    x = _x(40, 64)
    with torch.no_grad():
        small, big = root.a(x[:32]), root.a(x)
    assert calls == [40]
    assert torch.equal(big[:32], small)  # the same numbers whichever kernel serves a row
    plain = nn.Module()
    plain.a, _ = _layer(48, 64, 1, ext)
    install_packed_kernels(plain, tiled)  # no crossover in the plan: the VNNI kernel everywhere
    assert plain.a._packed_run is ext.int4_linear


def test_the_decode_steps_int4_layers_run_on_the_tiles_where_granted(amx):
    """A layer of the C++ decode step with an AMX crossover gives the VNNI layer's numbers on
    both sides of it."""
    from pesc_serve.kernels.cpu_kernels import _linear

    root = nn.Module()
    root.a, _ = _layer(96, 576, 2, amx)
    root.b, _ = _layer(96, 576, 2, amx, "int8-groups")
    install_packed_kernels(root, amx)
    for layer in (root.a, root.b):
        tiled, plain = _linear(amx, layer, amx_from=16), _linear(amx, layer)
        for rows in (1, 15, 16, 40):
            x = _x(rows, 576)
            assert torch.equal(tiled(x), plain(x)), rows
