"""The CPU kernel plan: which kernel serves a low-bit linear layer at which batch size, on this host.

One place decides, at load time, from the host's features and from timings taken on the host
itself (then cached per CPU and layer shape), and the start-up log says what it chose and why:

* CPUs without AVX512-VNNI: ATen's low-bit kernels for decode (<= 2 rows, the measured
  crossover of earlier releases) and dense bf16 copies above that.
* AVX512-VNNI CPUs: our int4/int8 kernels at every batch size, unless the host runs a dense
  bf16 GEMM faster for big batches.  That is timed: our packed AVX512-BF16 kernel and oneDNN's
  (``at::linear``; it uses AMX tiles on CPUs with AMX, once Linux granted them) against the
  int4 kernel on the model's FFN shape at 32 to 512 rows.  Where a dense kernel wins by a
  margin from some row count on, the plan keeps dense bf16 copies (twice the weight bytes)
  for batches from there, and names the kernel that serves them.
* Where Linux grants AMX tiles, the int4 kernel on AMX int8 tiles (csrc/amx_gemm.h) is timed
  too, once it gave the VNNI kernel's numbers bit for bit on this host, and serves the low-bit
  batches from the row count on which it wins (the dense copies are then weighed against it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import ModuleType

import torch

from pesc_serve.cache_dirs import cache_dir
from pesc_serve.kernels.cpu_features import CpuFeatures, cpu_tag, detect, request_amx_permission

logger = logging.getLogger(__name__)

ATEN_LOW_BIT_MAX_ROWS = 2  # without VNNI: ATen's int4 kernel / our int8 GEMV up to here, dense above
PLAN_ROWS = (32, 128, 512)  # batch sizes timed for the crossover (decode batches, prefill chunks)
DENSE_MARGIN = 1.5  # a dense kernel must be this much faster to be worth twice the weight bytes
MIN_TIMED_WEIGHTS = 1 << 20  # smaller layers are not timed: the host's noise exceeds any difference
DENSE_KERNELS = ("packed-bf16", "onednn-bf16")
AMX_MARGIN = 1.1  # the AMX int4 kernel must be this much faster than the VNNI one (same weights)
# A kernel's time grows with its rows: at most this factor beyond proportional from one timed
# size to the next, and never this factor below the smaller size's (a busy host breaks both).
SCALING_SLACK = 2.0

# (kernel, rows) -> seconds per call on the model's FFN shape
Timings = dict[tuple[str, int], float]


@dataclass(frozen=True)
class KernelPlan:
    """What serves the low-bit linears.  ``dense_above``: batches with more rows run on dense
    bf16 copies through ``dense_kernel`` (None: the low-bit kernel serves every batch)."""

    features: CpuFeatures
    low_bit: str  # "vnni" (ours) or "aten"
    dense_above: int | None
    dense_kernel: str  # "packed-bf16" (ours, AVX512-BF16) or "onednn-bf16" (at::linear: AMX where present)
    amx: bool = False  # the process may use AMX tiles (Linux granted the tile state)
    reasons: tuple[str, ...] = field(default=())
    amx_from: int | None = None  # int4 batches of at least this many rows run on AMX int8 tiles (None: never)

    def describe(self) -> str:
        serve = (f"{self.low_bit} low-bit kernels at every batch size" if self.dense_above is None else
                 f"{self.low_bit} low-bit kernels up to {self.dense_above} rows, {self.dense_kernel} on dense bf16 "
                 f"copies above")
        if self.amx_from is not None:
            serve += f" (int4 on AMX int8 tiles from {self.amx_from} rows)"
        return f"kernel plan for {self.features.describe()}{' (AMX granted)' if self.amx else ''}: {serve}" + \
            "".join(f"; {r}" for r in self.reasons)


def choose_plan(features: CpuFeatures, timings: Timings | None, amx: bool = False, built: bool = True) -> KernelPlan:
    """The plan for a host with ``features`` given the FFN-shape ``timings`` (None: not timed);
    ``built``: whether the C++ kernels are there at all."""
    if not features.avx512_vnni or not built:
        dense = "packed-bf16" if features.avx512_bf16 and built else "onednn-bf16"
        why = "no AVX512-VNNI" if built else "no C++ kernels"
        return KernelPlan(features, "aten", ATEN_LOW_BIT_MAX_ROWS, dense, amx,
                          (f"{why}: ATen's low-bit kernels serve decode rows",))
    if not timings:
        return KernelPlan(features, "vnni", None, "packed-bf16", amx, ("not timed",))
    reasons = []
    amx_wins = {rows: ("int4-amx", rows) in timings and timings[("int4-amx", rows)] * AMX_MARGIN
                < timings[("int4-vnni", rows)] for rows in PLAN_ROWS}
    first = _crossover(amx_wins)
    amx_from = None if first is None else (PLAN_ROWS[first - 1] + 1 if first else PLAN_ROWS[0])
    wins = {}
    for rows in PLAN_ROWS:
        low = timings[("int4-amx" if amx_from is not None and rows >= amx_from else "int4-vnni", rows)]
        kernel, best = min(((k, timings[(k, rows)]) for k in DENSE_KERNELS if (k, rows) in timings),
                           key=lambda kt: kt[1], default=(None, float("inf")))
        amx_note = f" (AMX {timings[('int4-amx', rows)] * 1e3:.2f} ms)" if ("int4-amx", rows) in timings else ""
        reasons.append(f"{rows} rows: int4 {timings[('int4-vnni', rows)] * 1e3:.2f} ms{amx_note}, "
                       f"{kernel} {best * 1e3:.2f} ms")
        wins[rows] = kernel if kernel is not None and best * DENSE_MARGIN < low else None
    # Dense copies from the smallest timed size on from which one dense kernel wins at every
    # larger size too (a single win is as likely a noisy host's accident as a crossover).
    for i, rows in enumerate(PLAN_ROWS):
        kernel = wins[rows]
        if kernel is not None and all(wins[r] == kernel for r in PLAN_ROWS[i:]):
            above = PLAN_ROWS[i - 1] if i else rows - 1
            tiles = amx_from if amx_from is not None and amx_from <= above else None  # below the dense rows
            return KernelPlan(features, "vnni", above, kernel, amx, tuple(reasons), tiles)
    return KernelPlan(features, "vnni", None, "packed-bf16", amx, tuple(reasons), amx_from)


def _crossover(wins: dict[int, bool]) -> int | None:
    """The index of the smallest timed size from which a kernel wins at every larger size too."""
    for i, rows in enumerate(PLAN_ROWS):
        if all(wins[r] for r in PLAN_ROWS[i:]):
            return i
    return None


def time_kernels(ext: ModuleType, k: int, n: int, amx: bool, repeats: int = 5) -> Timings:
    """Seconds per call of the int4 kernel and the dense bf16 kernels on a [n, k] weight, at
    PLAN_ROWS rows: the minimum over ``repeats`` alternating rounds (a noisy host slows some
    calls, never speeds any up)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    int4 = ext.PackedInt4(q[:, 0::2] | (q[:, 1::2] << 4), torch.rand(k // 32, n, 2, generator=g).half())
    w16 = w.to(torch.bfloat16)
    kernels: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "int4-vnni": lambda x: ext.int4_linear(x, int4),
        "onednn-bf16": lambda x: torch.nn.functional.linear(x.to(torch.bfloat16), w16),
    }
    if amx and amx_usable(ext, int4, k):
        kernels["int4-amx"] = lambda x: ext.int4_linear_amx(x, int4)
    if ext.have_bf16_gemm():
        packed = ext.PackedBf16(w16)
        kernels["packed-bf16"] = lambda x: ext.bf16_linear(x, packed)
    best: Timings = {}
    for rows in PLAN_ROWS:
        x = torch.randn(rows, k, generator=g)
        for f in kernels.values():
            f(x)  # first calls: oneDNN picks and caches its kernel
        for _ in range(repeats):
            for name, f in kernels.items():
                t = time.perf_counter()
                f(x)
                dt = time.perf_counter() - t
                best[(name, rows)] = min(dt, best.get((name, rows), float("inf")))
    return best


def amx_usable(ext: ModuleType, int4: object, k: int) -> bool:
    """Whether the AMX int4 kernel may serve here: built, the tiles granted, and its output the
    VNNI kernel's bit for bit (the same integer dot products and float operations in the same
    order) on rows that fill one tile and part of the next."""
    if not (ext.have_amx_int4() and ext.amx_ready()):
        return False
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(1))
    if torch.equal(ext.int4_linear_amx(x, int4), ext.int4_linear(x, int4)):
        return True
    logger.error("the AMX int4 kernel disagrees with the VNNI kernel on this host; it is not used")
    return False


def implausible(timings: Timings) -> list[str]:
    """What in ``timings`` no quiet host produces: a kernel slower on fewer rows, or more than
    proportionally slower on more.  Timings taken while another process held the cores (a
    training run, a test suite) look like this, and a plan cached from them would outlive the
    noise."""
    problems = []
    for kernel in sorted({k for k, _ in timings}):
        for small, big in zip(PLAN_ROWS, PLAN_ROWS[1:]):
            a, b = timings.get((kernel, small)), timings.get((kernel, big))
            if a is None or b is None:
                continue
            if a > b * SCALING_SLACK or b > a * (big / small) * SCALING_SLACK:
                problems.append(f"{kernel}: {small} rows {a * 1e3:.2f} ms, {big} rows {b * 1e3:.2f} ms")
    return problems


def host_plan(ext: ModuleType | None, k: int, n: int) -> KernelPlan:
    """This host's plan for a model whose FFN weight is [n, k]: timed once per CPU and shape,
    then read from the cache (``~/.cache/pesc_serve/plans``)."""
    features = detect()
    amx = request_amx_permission()
    if ext is None or not features.avx512_vnni:
        return choose_plan(features, None, amx, built=ext is not None)
    if k * n < MIN_TIMED_WEIGHTS:
        return replace(choose_plan(features, None, amx), reasons=(f"layers of {k * n} weights are not timed",))
    path = cache_dir("plans") / f"{cpu_tag()}-torch{torch.__version__}-k{k}-n{n}.json"
    timings: Timings | None = None
    try:
        timings = {(e["kernel"], e["rows"]): e["seconds"] for e in json.loads(path.read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if amx and timings and not any(kernel == "int4-amx" for kernel, _ in timings):
        timings = None  # cached before the AMX kernel existed (or while the tiles were not granted)
    if not timings or implausible(timings):
        timings, problems = _time_quietly(ext, k, n, amx)
        if problems:
            logger.warning("the CPU kernel timings look disturbed by other work on this host (%s): the plan "
                           "is not cached, and the next start times again", "; ".join(problems))
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps([{"kernel": kk, "rows": r, "seconds": s} for (kk, r), s in timings.items()]))
            except OSError:
                pass  # a read-only cache only means timing again next start
    return choose_plan(features, timings, amx)


def _time_quietly(ext: ModuleType, k: int, n: int, amx: bool, attempts: int = 2) -> tuple[Timings, list[str]]:
    """Time the kernels, once more if the first timings are implausible (a burst of other work);
    the timings and what is still implausible about them."""
    start = time.monotonic()
    for _ in range(attempts):
        timings = time_kernels(ext, k, n, amx)
        problems = implausible(timings)
        if not problems:
            break
    logger.info("timed the CPU kernels on the FFN shape [%d, %d] in %.1f s", n, k, time.monotonic() - start)
    return timings, problems
