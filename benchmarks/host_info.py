"""The host CPU, for benchmark results and for building llama.cpp's peer server.

    python -m benchmarks.host_info               # the host record (JSON) every result file carries
    python -m benchmarks.host_info --cmake-flags # the ggml -D options for this CPU, one per line
    python -m benchmarks.host_info --build-key   # a short key naming that flag set (cache directory)
    python -m benchmarks.host_info --describe    # one line for logs and build_flags.txt

Two uses, one reading of /proc/cpuinfo:

* ``host_cpu()``: model name, vendor, core count and the ISA flags that decide which kernels run
  (AVX2, AVX-512 and its VNNI/BF16/FP16 parts, AMX).  Every benchmark result records it, so that
  figures from different hosts are never compared as if they were one machine's.
* ``ggml_cmake_flags()``: explicit ggml instruction-set options for llama.cpp's CMake build, with
  ``GGML_NATIVE=OFF``.  ``-march=native`` (GGML_NATIVE=ON) also turns on AMX where a Xeon
  reports it, and that llama-server died with SIGILL in libggml-cpu at warm-up on such hosts;
  so AMX is always off and every other extension is on only when the CPU reports it.  The option
  names are those of the vendored llama.cpp's ggml/CMakeLists.txt (llama-cpp-python 0.3.36).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# ISA flags (as /proc/cpuinfo spells them) recorded with every benchmark result.
RECORDED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")

# ggml option -> the /proc/cpuinfo flags it needs (all of them).  GGML_AVX512 passes
# -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw to the compiler, hence five flags.
_GGML_X86 = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)
_AVX512_EXTENSIONS = ("GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16")  # only with GGML_AVX512
_ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def read_cpuinfo(text: str | None = None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    if text is None:
        try:
            text = CPUINFO.read_text()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # end of the first processor's block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def physical_cores(text: str | None = None) -> int | None:
    """Distinct (physical id, core id) pairs over all processors; None where cpuinfo lacks them."""
    if text is None:
        try:
            text = CPUINFO.read_text()
        except OSError:
            return None
    cores, package = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return len(cores) or None


def cpu_flags(cpuinfo: dict[str, str] | None = None) -> set[str]:
    info = read_cpuinfo() if cpuinfo is None else cpuinfo
    return set((info.get("flags") or info.get("Features") or "").split())


def host_cpu(cpuinfo_text: str | None = None) -> dict:
    """What a benchmark result records about the machine it ran on."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = CPUINFO.read_text()
        except OSError:
            cpuinfo_text = ""
    info = read_cpuinfo(cpuinfo_text)
    flags = cpu_flags(info)
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "model_name": info.get("model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id") or info.get("CPU implementer") or "",
        "cpu_count": os.cpu_count(),  # logical CPUs of the host
        "physical_cores": physical_cores(cpuinfo_text),
        "usable_cpus": affinity,      # those this process may run on (what the servers' threads get)
        "machine": platform.machine(),
        "isa": {f: f in flags for f in RECORDED_FLAGS},
    }


def ggml_cmake_flags(flags: set[str] | frozenset[str] | None = None) -> list[str]:
    """cmake -D options for ggml's CPU backend on a CPU with these /proc/cpuinfo flags.

    Always GGML_NATIVE=OFF (no -march=native) and the AMX options OFF; each other x86 option is
    ON exactly when the CPU reports every flag it needs.  On a CPU without x86 flags (ARM) the
    list is just GGML_NATIVE=OFF plus AMX OFF, and ggml picks its portable defaults.
    """
    flags = cpu_flags() if flags is None else set(flags)
    on = {name for name, need in _GGML_X86 if all(f in flags for f in need)}
    if "GGML_AVX512" not in on:
        on -= set(_AVX512_EXTENSIONS)
    opts = ["-DGGML_NATIVE=OFF"]
    opts += [f"-D{name}={'ON' if name in on else 'OFF'}" for name, _ in _GGML_X86]
    opts += [f"-D{name}=OFF" for name in _ALWAYS_OFF]
    return opts


def build_key(options: list[str]) -> str:
    """A short name for a flag set: builds with different flags never share a directory."""
    return "ggml-" + hashlib.sha256("\n".join(sorted(options)).encode()).hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--cmake-flags", action="store_true", help="ggml cmake -D options for this CPU, one per line")
    group.add_argument("--build-key", action="store_true", help="the cache key of that flag set")
    group.add_argument("--describe", action="store_true", help="one line: model name | vendor | CPUs | ISA flags")
    args = ap.parse_args()
    if args.cmake_flags:
        print("\n".join(ggml_cmake_flags()))
    elif args.build_key:
        print(build_key(ggml_cmake_flags()))
    elif args.describe:
        h = host_cpu()
        isa = " ".join(f for f, present in h["isa"].items() if present) or "none of the recorded ISA flags"
        print(f"{h['model_name']} | {h['vendor']} | {h['cpu_count']} CPUs | {isa}")
    else:
        print(json.dumps(host_cpu(), indent=2))


if __name__ == "__main__":
    main()
