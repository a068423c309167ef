"""What this CPU can run, read at run time: the machine behind a deployment (or a CI run) changes.

Linux lists a CPU's instruction sets in ``/proc/cpuinfo``; AMX also needs the process to ask
the kernel for the tile-data state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``)
before the first tile instruction, or that instruction faults.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

ARCH_REQ_XCOMP_PERM = 0x1023  # arch/x86/include/uapi/asm/prctl.h
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction sets the kernels choose between (from the CPU's flags)."""

    model: str = ""
    avx2: bool = False
    avx512: bool = False  # F + BW + VL: what every AVX-512 kernel here needs
    avx512_vnni: bool = False
    avx512_bf16: bool = False
    avx512_fp16: bool = False
    amx_tile: bool = False
    amx_int8: bool = False
    amx_bf16: bool = False

    @classmethod
    def from_cpuinfo(cls, text: str) -> "CpuFeatures":
        """Parse ``/proc/cpuinfo`` (the first processor's model name and flags)."""
        model, flags = "", set()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
        avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags
        return cls(
            model=model,
            avx2="avx2" in flags,
            avx512=avx512,
            avx512_vnni=avx512 and "avx512_vnni" in flags,
            avx512_bf16=avx512 and "avx512_bf16" in flags,
            avx512_fp16=avx512 and "avx512_fp16" in flags,
            amx_tile="amx_tile" in flags,
            amx_int8="amx_tile" in flags and "amx_int8" in flags,
            amx_bf16="amx_tile" in flags and "amx_bf16" in flags,
        )

    def describe(self) -> str:
        """One line for the start-up log."""
        names = [name for name, on in (("AVX2", self.avx2), ("AVX-512", self.avx512), ("VNNI", self.avx512_vnni),
                                       ("BF16", self.avx512_bf16), ("FP16", self.avx512_fp16),
                                       ("AMX-INT8", self.amx_int8), ("AMX-BF16", self.amx_bf16)) if on]
        return f"{self.model or 'unknown CPU'}: {', '.join(names) or 'no AVX2'}"


@lru_cache(maxsize=1)
def cpu_info_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def detect() -> CpuFeatures:
    """This host's features."""
    return CpuFeatures.from_cpuinfo(cpu_info_text())


@lru_cache(maxsize=1)
def request_amx_permission() -> bool:
    """Ask Linux for AMX's tile-data state for this process; True when AMX may be used.

    Without the permission the first tile instruction raises SIGILL.  The request is per
    process (threads started later inherit it) and harmless where AMX is absent (it fails)."""
    if not detect().amx_tile:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        ok = False
    if not ok:
        logger.warning("the CPU reports AMX but Linux refused its tile state (errno %d); AMX stays off",
                       ctypes.get_errno())
    return ok


def cpu_tag() -> str:
    """A short digest of this CPU's model and feature flags.  The build uses -march=native, so
    a cache made on one CPU must never load on another (it could stop on an illegal
    instruction): the machine behind a home directory can change between runs."""
    model = flags = ""
    for line in cpu_info_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = " ".join(sorted(value.split()))
    return hashlib.sha1(f"{model}|{flags}".encode()).hexdigest()[:10]
