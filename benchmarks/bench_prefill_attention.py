"""Time of the C++ prefill attention for one layer of a long prompt, chunked as the scheduler
chunks it (512 tokens a step), straight from a float16 paged KV cache.

    python -m benchmarks.bench_prefill_attention --tokens 1536 --repeats 5

Reports the best of ``--repeats`` rounds (a noisy host only slows rounds down) and the GFLOP/s
of the causal QK and PV products.  Shapes default to the bundled model's (9 query heads, 3 KV
heads, head size 64).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.host_info import host_cpu
from pesc_serve.kernels.build import load_extension


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ext = load_extension()
    g = torch.Generator().manual_seed(0)
    n, bs = args.tokens, args.block_size
    blocks = -(-n // bs)
    cache = torch.randn(2, blocks * bs, args.kv_heads, args.head_dim, generator=g).half()
    table = torch.arange(blocks)
    starts = list(range(0, n, args.chunk))
    qs = [torch.randn(min(args.chunk, n - a), args.q_heads, args.head_dim, generator=g) for a in starts]
    best = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        for a, q in zip(starts, qs):
            ext.prefill_attention(q, cache, table[: -(-(a + q.shape[0]) // bs)], a, bs, -1)
        best = min(best, time.perf_counter() - t)
    keys = sum(a * q.shape[0] + q.shape[0] * (q.shape[0] + 1) / 2 for a, q in zip(starts, qs))  # causal pairs
    flops = 4 * args.q_heads * args.head_dim * keys
    print(f"{host_cpu()['model_name']}, {torch.get_num_threads()} threads: one layer of a {n}-token prompt in "
          f"{args.chunk}-token chunks: {best * 1e3:.1f} ms, {flops / best / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
