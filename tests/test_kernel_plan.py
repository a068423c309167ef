"""The CPU kernel plan: one place decides which kernel serves which batch size, from the host's
features and timings taken on it (kernels/plan.py)."""

from __future__ import annotations

import pytest
import torch

from pesc_serve.kernels import plan as plan_mod
from pesc_serve.kernels.cpu_features import CpuFeatures
from pesc_serve.kernels.plan import PLAN_ROWS, choose_plan

AMD = CpuFeatures("AMD EPYC", avx2=True, avx512=True, avx512_vnni=True, avx512_bf16=True)
XEON = CpuFeatures("Intel Xeon", avx2=True, avx512=True, avx512_vnni=True, avx512_bf16=True, avx512_fp16=True,
                   amx_tile=True, amx_int8=True, amx_bf16=True)


def _timings(int4: dict[int, float], packed: dict[int, float], onednn: dict[int, float]) -> dict:
    t = {}
    for rows in PLAN_ROWS:
        t[("int4-vnni", rows)], t[("packed-bf16", rows)], t[("onednn-bf16", rows)] = int4[rows], packed[rows], onednn[rows]
    return t


def test_the_low_bit_kernels_serve_every_batch_where_they_win_everywhere():
    """As on the AMD EPYC: the VNNI kernel beats bf16 at every timed size, so no dense copies."""
    t = _timings({32: 1.0, 128: 3.0, 512: 11.0}, {32: 1.5, 128: 3.4, 512: 11.5}, {32: 2.0, 128: 4.0, 512: 12.0})
    p = choose_plan(AMD, t)
    assert p.low_bit == "vnni" and p.dense_above is None
    assert "every batch size" in p.describe()
    assert len(p.reasons) == len(PLAN_ROWS)  # the timings are in the log line


def test_a_host_whose_dense_gemm_wins_big_batches_gets_dense_copies_from_the_crossover():
    """As oneDNN on AMX tiles would: bf16 wins from 128 rows on, so batches above 32 rows run dense."""
    t = _timings({32: 1.0, 128: 4.0, 512: 16.0}, {32: 1.4, 128: 3.9, 512: 15.0}, {32: 1.2, 128: 1.0, 512: 2.0})
    p = choose_plan(XEON, t, amx=True)
    assert p.dense_above == 32 and p.dense_kernel == "onednn-bf16"
    assert "AMX granted" in p.describe() and "onednn-bf16" in p.describe()
    # a dense kernel barely faster is not worth twice the weight bytes
    close = _timings({32: 1.0, 128: 4.0, 512: 16.0}, {32: 1.4, 128: 3.9, 512: 15.0}, {32: 1.2, 128: 3.8, 512: 12.0})
    assert choose_plan(XEON, close).dense_above is None
    # one win at a middle size, lost again above it, is noise: no dense copies
    noisy = _timings({32: 1.0, 128: 4.0, 512: 16.0}, {32: 1.4, 128: 3.9, 512: 15.0}, {32: 1.2, 128: 1.0, 512: 15.0})
    assert choose_plan(XEON, noisy).dense_above is None


def test_without_vnni_atens_kernels_serve_decode_and_dense_copies_the_rest():
    p = choose_plan(CpuFeatures("old", avx2=True), None)
    assert p.low_bit == "aten" and p.dense_above == plan_mod.ATEN_LOW_BIT_MAX_ROWS and p.dense_kernel == "onednn-bf16"
    bf16_host = CpuFeatures("bf16 no vnni", avx2=True, avx512=True, avx512_bf16=True)
    assert choose_plan(bf16_host, None).dense_kernel == "packed-bf16"


def test_the_host_is_timed_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PESC_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(plan_mod, "detect", lambda: AMD)
    calls = []

    def fake_timing(ext, k, n, amx, repeats=5):
        calls.append((k, n))
        return _timings({32: 1.0, 128: 4.0, 512: 16.0}, {32: 2.0, 128: 1.0, 512: 2.0}, {32: 3.0, 128: 3.0, 512: 9.0})

    monkeypatch.setattr(plan_mod, "time_kernels", fake_timing)
    first = plan_mod.host_plan(object(), 576, 3072)
    second = plan_mod.host_plan(object(), 576, 3072)
    assert calls == [(576, 3072)] and first == second
    assert first.dense_above == 32 and first.dense_kernel == "packed-bf16"
    plan_mod.host_plan(object(), 960, 5120)  # another shape is timed anew
    assert calls == [(576, 3072), (960, 5120)]
    tiny = plan_mod.host_plan(object(), 64, 256)  # too small to time: the low-bit kernels everywhere
    assert len(calls) == 2 and tiny.dense_above is None and "not timed" in tiny.describe()


def test_timing_runs_every_kernel_on_this_host():
    from pesc_serve.kernels.build import load_extension

    ext = load_extension()
    if not ext.have_vnni():
        pytest.skip("this host has no AVX512-VNNI (the int4 kernel is not built)")
    t = plan_mod.time_kernels(ext, 64, 128, amx=False, repeats=1)
    kernels = {"int4-vnni", "onednn-bf16"} | ({"packed-bf16"} if ext.have_bf16_gemm() else set())
    assert set(t) == {(k, r) for k in kernels for r in PLAN_ROWS} and all(v > 0 for v in t.values())


def test_a_loaded_model_follows_the_plan(monkeypatch, tiny_checkpoint_factory):
    """The loader asks the plan which batches run on dense copies, and with which GEMM."""
    from pesc_serve.config import LoadConfig
    from pesc_serve.layers.quant import HybridLinear
    from pesc_serve.models import loader
    from pesc_serve.registry import resolve_model

    onednn = choose_plan(XEON, _timings({32: 1.0, 128: 4.0, 512: 16.0}, {32: 2.0, 128: 3.9, 512: 15.0},
                                        {32: 0.5, 128: 1.0, 512: 2.0}))  # dense from 32 rows on: above 31
    monkeypatch.setattr(loader, "cpu_kernel_plan", lambda cfg: onednn)
    path = str(tiny_checkpoint_factory("llama"))
    lm = loader.load_model(resolve_model(path), LoadConfig(model=path, dtype="float32", device="cpu", quantization="int4"))
    assert lm.quantization.hybrid_max_rows == onednn.dense_above == 31
    hybrids = [m for m in lm.model.modules() if isinstance(m, HybridLinear)]
    assert hybrids and all(m.max_rows == 31 and m.dense_kernel == "onednn-bf16" for m in hybrids)
    from pesc_serve.kernels.build import load_extension
    from pesc_serve.kernels.cpu_kernels import install_packed_kernels

    install_packed_kernels(lm.model, load_extension())
    assert all(m.large.packed is None for m in hybrids)  # oneDNN runs the dense copies, not our packed kernel
    x = torch.randn(40, lm.config.hidden_size)
    assert torch.isfinite(hybrids[0](x)).all()


def test_timings_from_a_busy_host_are_timed_again_and_never_cached(monkeypatch, tmp_path):
    """A plan timed while another process held the cores (here: 512 rows 50x the time of 128)
    would be cached for every later start; such timings are retaken, and not cached if they stay
    implausible."""
    monkeypatch.setenv("PESC_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(plan_mod, "detect", lambda: AMD)
    quiet = _timings({32: 1.0, 128: 3.0, 512: 11.0}, {32: 1.5, 128: 3.4, 512: 11.5}, {32: 2.0, 128: 4.0, 512: 12.0})
    busy = dict(quiet)
    busy[("int4-vnni", 512)] = 150.0
    assert plan_mod.implausible(busy) and not plan_mod.implausible(quiet)
    slower_on_fewer_rows = dict(quiet)
    slower_on_fewer_rows[("onednn-bf16", 32)] = 40.0
    assert plan_mod.implausible(slower_on_fewer_rows)

    served = [busy, busy, busy, quiet]
    monkeypatch.setattr(plan_mod, "time_kernels", lambda ext, k, n, amx, repeats=5: served.pop(0))
    plan_mod.host_plan(object(), 576, 3072)  # timed twice, both disturbed: not cached
    assert len(served) == 2 and not list(tmp_path.rglob("*.json"))
    plan = plan_mod.host_plan(object(), 576, 3072)  # a busy try, then a quiet one: cached
    assert not served and len(list(tmp_path.rglob("*.json"))) == 1
    assert plan.dense_above is None
    assert plan_mod.host_plan(object(), 576, 3072) == plan  # read from the cache, nothing timed


def test_an_implausible_cached_plan_is_timed_again(monkeypatch, tmp_path):
    monkeypatch.setenv("PESC_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(plan_mod, "detect", lambda: AMD)
    quiet = _timings({32: 1.0, 128: 3.0, 512: 11.0}, {32: 1.5, 128: 3.4, 512: 11.5}, {32: 2.0, 128: 4.0, 512: 12.0})
    busy = dict(quiet)
    busy[("int4-vnni", 32)] = 40.0
    calls = []
    monkeypatch.setattr(plan_mod, "time_kernels", lambda ext, k, n, amx, repeats=5: calls.append(1) or quiet)
    plan_mod.host_plan(object(), 576, 3072)
    cached = next(tmp_path.rglob("*.json"))
    cached.write_text(__import__("json").dumps([{"kernel": k, "rows": r, "seconds": s} for (k, r), s in busy.items()]))
    plan_mod.host_plan(object(), 576, 3072)
    assert len(calls) == 2


def _with_amx(t: dict, amx: dict[int, float]) -> dict:
    return {**t, **{("int4-amx", rows): amx[rows] for rows in PLAN_ROWS}}


def test_the_amx_int4_kernel_serves_int4_batches_from_where_it_wins():
    """On an AMX host the tiles take the int4 batches from their crossover on; the dense copies
    are then weighed against the faster of the two int4 kernels."""
    t = _timings({32: 1.0, 128: 4.0, 512: 16.0}, {32: 1.4, 128: 3.9, 512: 15.0}, {32: 1.2, 128: 3.0, 512: 9.0})
    assert choose_plan(XEON, t, amx=True).dense_above == 128  # oneDNN 9 ms against int4's 16 at 512 rows
    p = choose_plan(XEON, _with_amx(t, {32: 0.95, 128: 2.0, 512: 7.0}), amx=True)
    assert p.amx_from == 33 and p.dense_above is None  # the tiles beat oneDNN's 9 ms: no dense copies
    assert "AMX int8 tiles from 33 rows" in p.describe() and "AMX 7000.00 ms" in p.describe()
    assert choose_plan(XEON, _with_amx(t, {32: 0.5, 128: 1.0, 512: 4.0}), amx=True).amx_from == 32
    # a win at one size lost again above it is noise; a win by less than the margin is none
    assert choose_plan(XEON, _with_amx(t, {32: 0.5, 128: 3.0, 512: 17.0}), amx=True).amx_from is None
    assert choose_plan(XEON, _with_amx(t, {32: 0.95, 128: 3.8, 512: 15.5}), amx=True).amx_from is None
    # dense copies that still win take the big batches; the tiles keep the rows below them
    p = choose_plan(XEON, _with_amx(t, {32: 0.5, 128: 2.0, 512: 14.0}), amx=True)
    assert p.dense_above == 128 and p.amx_from == 32


def test_a_cached_plan_without_the_amx_kernel_is_timed_again_where_tiles_are_granted(monkeypatch, tmp_path):
    monkeypatch.setenv("PESC_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(plan_mod, "detect", lambda: XEON)
    granted = [False]
    monkeypatch.setattr(plan_mod, "request_amx_permission", lambda: granted[0])
    calls = []

    def fake_timing(ext, k, n, amx, repeats=5):
        calls.append(amx)
        t = _timings({32: 1.0, 128: 4.0, 512: 16.0}, {32: 2.0, 128: 8.0, 512: 32.0}, {32: 3.0, 128: 9.0, 512: 30.0})
        return _with_amx(t, {32: 0.5, 128: 1.0, 512: 4.0}) if amx else t

    monkeypatch.setattr(plan_mod, "time_kernels", fake_timing)
    assert plan_mod.host_plan(object(), 576, 3072).amx_from is None
    granted[0] = True
    assert plan_mod.host_plan(object(), 576, 3072).amx_from == 32
    assert plan_mod.host_plan(object(), 576, 3072).amx_from == 32
    assert calls == [False, True]
