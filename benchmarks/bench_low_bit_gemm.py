"""The CPU GEMMs one linear layer can run on, side by side, at decode and prefill row counts.

    python -m benchmarks.bench_low_bit_gemm --repeats 5

For each weight shape (default: the bundled model's fused gate/up projection [3072, 576], its
down projection [576, 1536] and its LM head [49152, 576]) and row count, the best of
``--repeats`` rounds (a noisy host only slows rounds down) of every kernel this host runs: the
int4 and int8 kernels on AVX512-VNNI and, where Linux grants AMX tiles, on AMX int8 tiles;
our packed AVX512-BF16 GEMM; oneDNN's bf16 ``linear`` (AMX-BF16 where present).  This is what
the kernel plan (pesc_serve/kernels/plan.py) times in small, at 32, 128 and 512 rows.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.host_info import host_cpu
from pesc_serve.kernels.build import load_extension
from pesc_serve.kernels.cpu_features import request_amx_permission

SHAPES = ((3072, 576), (576, 1536), (49152, 576))
ROWS = (1, 16, 32, 128, 512, 2048)


def kernels_for(ext, n: int, k: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Every kernel this host runs on an [n, k] weight (random values: timing only)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    int4 = ext.PackedInt4(q[:, 0::2] | (q[:, 1::2] << 4), torch.rand(k // 32, n, 2, generator=g).half())
    int8 = ext.PackedInt8(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                          (torch.rand(n, k // 32, generator=g) * 0.01).half())
    w16 = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if ext.have_vnni():
        out["int4-vnni"] = lambda x: ext.int4_linear(x, int4)
        out["int8-vnni"] = lambda x: ext.int8_linear(x, int8)
    if ext.have_amx_int4() and ext.amx_ready():
        out["int4-amx"] = lambda x: ext.int4_linear_amx(x, int4)
        out["int8-amx"] = lambda x: ext.int8_linear_amx(x, int8)
    if ext.have_bf16_gemm():
        packed = ext.PackedBf16(w16)
        out["packed-bf16"] = lambda x: ext.bf16_linear(x, packed)
    out["onednn-bf16"] = lambda x: torch.nn.functional.linear(x.to(torch.bfloat16), w16)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK weights, comma-separated")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/low_bit_gemm.json"))
    args = ap.parse_args()
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        rows_list = [int(r) for r in args.rows.split(",")]
    except ValueError:
        ap.error("--shapes takes NxK pairs (e.g. 3072x576) and --rows integers, comma-separated")
    if any(len(s) != 2 or s[0] % 16 or s[1] % 32 for s in shapes) or any(r < 1 for r in rows_list):
        ap.error("each weight needs N % 16 == 0 and K % 32 == 0, and rows must be >= 1")
    amx = request_amx_permission()
    ext = load_extension()
    host = host_cpu()
    results = []
    print(f"{host['model_name']}, {torch.get_num_threads()} threads, AMX tiles {'granted' if amx else 'not available'}")
    for n, k in shapes:
        kernels = kernels_for(ext, n, k)
        for rows in rows_list:
            x = torch.randn(rows, k)
            for f in kernels.values():
                f(x)  # first calls: oneDNN picks and caches its kernel
            best = {name: float("inf") for name in kernels}
            for _ in range(args.repeats):
                for name, f in kernels.items():
                    t = time.perf_counter()
                    f(x)
                    best[name] = min(best[name], time.perf_counter() - t)
            flops = 2 * rows * n * k
            line = ", ".join(f"{name} {s * 1e3:.2f} ms ({flops / s / 1e9:.0f} GFLOP/s)" for name, s in best.items())
            print(f"[{n}, {k}] x {rows} rows: {line}")
            results += [{"n": n, "k": k, "rows": rows, "kernel": name, "seconds": s, "gflops": flops / s / 1e9}
                        for name, s in best.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"host": host, "threads": torch.get_num_threads(), "amx": amx,
                                    "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
