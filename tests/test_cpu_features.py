"""CPU feature detection: what the kernels may use is read from the host, never assumed."""

from __future__ import annotations

from pesc_serve.kernels import cpu_features
from pesc_serve.kernels.cpu_features import CpuFeatures

AMD = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni
"""
INTEL = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
AVX2_ONLY = "model name\t: Old CPU\nflags\t\t: fpu sse avx avx2 fma\n"


def test_the_two_hosts_of_this_project_read_as_what_they_are():
    amd = CpuFeatures.from_cpuinfo(AMD)
    assert amd.model == "AMD EPYC" and amd.avx512_vnni and amd.avx512_bf16
    assert not (amd.avx512_fp16 or amd.amx_tile or amd.amx_int8 or amd.amx_bf16)
    intel = CpuFeatures.from_cpuinfo(INTEL)
    assert intel.amx_tile and intel.amx_int8 and intel.amx_bf16 and intel.avx512_fp16
    assert "AMX-INT8" in intel.describe() and "AMX" not in amd.describe()


def test_avx512_extensions_need_the_avx512_base():
    old = CpuFeatures.from_cpuinfo(AVX2_ONLY)
    assert old.avx2 and not (old.avx512 or old.avx512_vnni or old.avx512_bf16)
    odd = CpuFeatures.from_cpuinfo("flags\t: avx2 avx512_vnni avx512_bf16\n")  # no avx512f/bw/vl
    assert not (odd.avx512_vnni or odd.avx512_bf16)
    assert CpuFeatures.from_cpuinfo("").describe() == "unknown CPU: no AVX2"


def test_amx_permission_is_asked_only_where_the_cpu_has_amx(monkeypatch):
    cpu_features.request_amx_permission.cache_clear()
    try:
        if cpu_features.detect().amx_tile:
            assert cpu_features.request_amx_permission()  # Linux grants it to any process that asks
        else:
            assert not cpu_features.request_amx_permission()
        cpu_features.request_amx_permission.cache_clear()
        monkeypatch.setattr(cpu_features, "cpu_info_text", lambda: AMD)
        assert not cpu_features.request_amx_permission()
    finally:
        cpu_features.request_amx_permission.cache_clear()
