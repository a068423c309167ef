"""benchmarks/host_info.py: the ggml flag mapping and the host record (nothing is built here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import host_info
from benchmarks.host_info import build_key, ggml_cmake_flags, host_cpu, read_cpuinfo

ROOT = Path(__file__).resolve().parents[1]

# /proc/cpuinfo flags of an AMD EPYC (Zen 4: AVX-512 with VNNI/BF16/VBMI, no AMX, no AVX-VNNI).
AMD_ZEN4 = set("""fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2
ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl cpuid extd_apicid pni pclmulqdq ssse3
fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy
abm sse4a misalignsse 3dnowprefetch osvw topoext invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2
smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw
avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr rdpru wbnoinvd arat avx512vbmi umip pku
ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm""".split())

# An Intel Xeon (Sapphire Rapids) that reports AMX: the host whose -march=native build hit SIGILL.
INTEL_SPR_AMX = set("""fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse
sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology cpuid tsc_known_freq pni pclmulqdq
ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor
lahf_lm abm 3dnowprefetch fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed
adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni
avx512_bf16 wbnoinvd arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni
avx512_bitalg avx512_vpopcntdq rdpid cldemote movdiri movdir64b md_clear serialize tsxldtrk amx_bf16
avx512_fp16 amx_tile amx_int8 arch_capabilities""".split())

# Haswell-class: AVX2/FMA/F16C/BMI2, no AVX-512.
AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}


def as_dict(opts: list[str]) -> dict[str, str]:
    out = {}
    for opt in opts:
        m = re.fullmatch(r"-D(GGML_[A-Z0-9_]+)=(ON|OFF)", opt)
        assert m, opt
        assert m.group(1) not in out, f"{m.group(1)} given twice"
        out[m.group(1)] = m.group(2)
    return out


def test_amd_avx512_host_gets_avx512_vnni_bf16_and_no_amx():
    d = as_dict(ggml_cmake_flags(AMD_ZEN4))
    assert d["GGML_NATIVE"] == "OFF"
    for name in ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512",
                 "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"):
        assert d[name] == "ON", name
    assert d["GGML_AVX_VNNI"] == "OFF"  # Zen 4 has AVX512-VNNI but not the VEX-encoded AVX-VNNI
    assert d["GGML_AMX_TILE"] == d["GGML_AMX_INT8"] == d["GGML_AMX_BF16"] == "OFF"


def test_intel_host_reporting_amx_still_gets_amx_off():
    d = as_dict(ggml_cmake_flags(INTEL_SPR_AMX))
    assert {"amx_tile", "amx_int8", "amx_bf16"} <= INTEL_SPR_AMX
    assert d["GGML_NATIVE"] == "OFF"
    assert d["GGML_AMX_TILE"] == d["GGML_AMX_INT8"] == d["GGML_AMX_BF16"] == "OFF"
    assert d["GGML_AVX512"] == d["GGML_AVX512_VNNI"] == d["GGML_AVX512_BF16"] == d["GGML_AVX512_VBMI"] == "ON"
    assert d["GGML_AVX_VNNI"] == "ON"


def test_avx2_host_gets_no_avx512_and_partial_avx512_is_not_enough():
    d = as_dict(ggml_cmake_flags(AVX2_ONLY))
    assert d["GGML_AVX2"] == d["GGML_FMA"] == d["GGML_F16C"] == "ON"
    assert all(d[n] == "OFF" for n in ("GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX512_VBMI"))
    # GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw; the extensions mean nothing without it.
    d = as_dict(ggml_cmake_flags(AVX2_ONLY | {"avx512f", "avx512_vnni", "avx512_bf16"}))
    assert d["GGML_AVX512"] == d["GGML_AVX512_VNNI"] == d["GGML_AVX512_BF16"] == "OFF"


def test_non_x86_host_gets_only_native_and_amx_off():
    d = as_dict(ggml_cmake_flags({"fp", "asimd", "sve"}))
    assert d["GGML_NATIVE"] == "OFF"
    assert all(v == "OFF" for v in d.values())


def test_build_key_names_the_flag_set():
    assert build_key(ggml_cmake_flags(AMD_ZEN4)) == build_key(ggml_cmake_flags(set(AMD_ZEN4)))
    assert build_key(ggml_cmake_flags(AMD_ZEN4)) != build_key(ggml_cmake_flags(INTEL_SPR_AMX))
    assert build_key(ggml_cmake_flags(AVX2_ONLY)) != build_key(ggml_cmake_flags(AMD_ZEN4))
    assert re.fullmatch(r"ggml-[0-9a-f]{12}", build_key(ggml_cmake_flags(AMD_ZEN4)))


def test_option_names_exist_in_the_vendored_llama_cpp():
    """Only when setup_llama_cpp.sh has unpacked the sdist (reads CMake files, builds nothing)."""
    lists = sorted((ROOT / "benchmarks/peers/_build/src").glob("llama_cpp_python-*/vendor/llama.cpp/ggml/CMakeLists.txt"))
    if not lists:
        pytest.skip("llama.cpp sources not unpacked (benchmarks/peers/setup_llama_cpp.sh)")
    declared = set(re.findall(r"option\((GGML_[A-Z0-9_]+)", lists[-1].read_text()))
    assert set(as_dict(ggml_cmake_flags(INTEL_SPR_AMX))) <= declared


CPUINFO = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
physical id	: 0
core id	: 0
flags		: fpu sse4_2 avx avx2 fma f16c avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_int8 amx_bf16

processor	: 1
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
physical id	: 0
core id	: 0
flags		: fpu sse4_2 avx avx2 fma f16c avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_int8 amx_bf16

processor	: 2
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
physical id	: 0
core id	: 1
flags		: fpu sse4_2 avx avx2 fma f16c avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_int8 amx_bf16
"""


def test_host_cpu_from_cpuinfo_text():
    h = host_cpu(CPUINFO)
    assert h["model_name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert h["vendor"] == "GenuineIntel"
    assert h["physical_cores"] == 2
    assert h["isa"] == {f: True for f in host_info.RECORDED_FLAGS}
    assert read_cpuinfo(CPUINFO)["processor"] == "0"  # the first processor's block only
    json.dumps(h)


def test_host_cpu_on_this_machine_has_every_field():
    h = host_cpu()
    assert {"model_name", "vendor", "cpu_count", "physical_cores", "isa"} <= set(h)
    assert set(h["isa"]) == {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                             "amx_tile", "amx_int8", "amx_bf16"}
    assert isinstance(h["cpu_count"], int) and h["cpu_count"] >= 1
    if Path("/proc/cpuinfo").is_file():
        assert h["model_name"] and h["vendor"]
    json.dumps(h)


def test_long_context_prompts_are_distinct_from_their_first_word():
    from benchmarks.run_comparison import long_context_prompts, parse_metrics

    prompts = long_context_prompts()
    assert len(prompts) == 64
    assert len({p.split()[0] for p in prompts}) == 64
    assert all(780 < len(p.split()) < 1000 for p in prompts)
    assert long_context_prompts() == prompts  # seeded
    text = "# HELP x\npesc:num_preemptions 3.0\npesc:prefix_cache_hits_total 2\npesc:expert_tokens{layer=\"0\"} 5\n"
    assert parse_metrics(text) == {"pesc:num_preemptions": 3.0, "pesc:prefix_cache_hits_total": 2.0}
