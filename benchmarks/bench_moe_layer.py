"""The PESC MLP alone: our dispatch strategies vs the authors' per-expert loop vs the dense FFN.

    python benchmarks/bench_moe_layer.py [--dims small,camelidae-8x7b] [--tokens 1,8,64,512]

Strategies timed (each includes the shared FFN and the router, as a layer runs them):
  authors-loop   the authors' code: FFN once, repeat_interleave(k), Python loop over all experts
                 with boolean masks (the reference to beat)
  dense-stacked  all experts in two GEMMs, unselected experts weighted 0
  grouped        (token, expert) pairs sorted by expert, one GEMM pair per active expert
  gather         per pair, the selected expert's matrices gathered and batch-multiplied
  padded         pairs sorted by expert into an [E, C, H] buffer, two batched GEMMs
  PyTorch auto   the dispatch PescMLP picks per batch size among the four above (PyTorch ops)
  ours (auto)    pesc_serve's PescMLP as the server runs it: on CPU with the C++ kernels built,
                 the expert-grouped bf16 adapter kernel; otherwise the PyTorch auto dispatch
  dense FFN      the shared FFN alone (what the dense base model runs)

Timings are medians over interleaved repetitions (strategies take turns in a fresh random order
each time, so machine noise and the previous call's cache footprint hit them alike).  The LAST line printed is one JSON object with the headline ratios, the timings and the host CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    from benchmarks.host_info import host_cpu
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from host_info import host_cpu
from pesc_serve.allocator import keep_freed_buffers
from pesc_serve.layers.pesc_mlp import DISPATCHES, PescMLP, choose_dispatch, route


@dataclass(frozen=True)
class Dims:
    name: str
    hidden: int
    ffn: int
    experts: int
    topk: int
    adapter: int


DIMS = {
    "small": Dims("small (camelidae-smol-8x135m)", 576, 1536, 8, 2, 64),
    "camelidae-8x7b": Dims("Camelidae-8x7B", 4096, 11008, 8, 2, 512),
}


def build(d: Dims, dtype: torch.dtype, device: torch.device, seed: int = 0) -> PescMLP:
    torch.manual_seed(seed)
    with torch.device(device):
        mlp = PescMLP(d.hidden, d.ffn, d.experts, d.topk, d.adapter)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    mlp = mlp.to(dtype).eval()
    mlp.finalize()
    return mlp


def authors_loop(mlp: PescMLP, x: torch.Tensor) -> torch.Tensor:
    """Transcription of the reference modeling code's MoE adapter (flat tokens)."""
    f = mlp.ffn(x)
    logits = F.linear(x, mlp.router.weight)
    weights, selected = torch.topk(logits, mlp.topk, dim=-1)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(x.dtype)
    flat_idx = selected.view(-1)
    h = f.repeat_interleave(mlp.topk, dim=0)
    y = torch.empty_like(h)
    for e in range(mlp.num_experts):
        mask = flat_idx == e
        y[mask] = h[mask] + F.gelu(h[mask] @ mlp.adapter_down[e].t()) @ mlp.adapter_up[e].t()
    return (y.view(*weights.shape, -1) * weights.unsqueeze(-1)).sum(dim=1)


def strategy(mlp: PescMLP, name: str):
    def fwd(x: torch.Tensor) -> torch.Tensor:
        f = mlp.ffn(x)
        p, idx = route(x, mlp.router.weight, mlp.topk)
        run = DISPATCHES[name] if name != "auto" else choose_dispatch("auto", x.shape[0], mlp.num_experts, mlp.topk, x.is_cpu)
        return run(f, mlp.adapter_down, mlp.adapter_up_t, p, idx)

    return fwd


def install_kernels(mlp: PescMLP) -> bool:
    """What the server does on CPU: the C++ grouped adapters when the extension builds."""
    if mlp.adapter_down.device.type != "cpu":
        return False
    from pesc_serve.models.cpu_decode import install_grouped_adapters, load_extension

    try:
        return install_grouped_adapters(mlp, load_extension()) > 0
    except Exception as exc:  # no compiler: ours stays on the PyTorch dispatch, as the server would
        print(f"C++ kernels unavailable ({exc}); 'ours' runs the PyTorch dispatch")
        return False


def time_all(fns: dict, x: torch.Tensor, reps: int, warmup: int = 2) -> dict[str, float]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        order = list(fns)
        shuffle = random.Random(0).shuffle
        for _ in range(reps):
            shuffle(order)  # no strategy always runs right after the same one (cache state)
            for name in order:
                fn = fns[name]
                sync()
                t = time.perf_counter()
                fn(x)
                sync()
                samples[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def reps_for(d: Dims, t: int) -> int:
    work = d.hidden * d.ffn * t
    return max(5, min(200, int(4e9 / max(work, 1))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="small,camelidae-8x7b")
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    keep_freed_buffers()  # the server's allocator setting (pesc_serve/allocator.py), for every strategy alike
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for key in args.dims.split(","):
        d = DIMS[key]
        mlp = build(d, dtype, device)
        kernels = install_kernels(mlp)
        fns = {
            "authors-loop": lambda x, m=mlp: authors_loop(m, x),
            "dense-stacked": strategy(mlp, "dense"),
            "grouped": strategy(mlp, "grouped"),
            "gather": strategy(mlp, "gather"),
            "padded": strategy(mlp, "padded"),
            "PyTorch auto": strategy(mlp, "auto"),
            "ours (auto)": mlp,
            "dense FFN": mlp.ffn,
        }
        results[key] = {}
        where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
        print(f"\n{d.name}: H {d.hidden}, FFN {d.ffn}, E {d.experts}, k {d.topk}, r {d.adapter}, {args.dtype}, "
              f"{where}; ours = {'C++ grouped adapters' if kernels else 'PyTorch auto'}; median ms per call")
        print(f"{'T':>5} " + " ".join(f"{n:>14}" for n in fns) + f" {'ours/FFN':>9} {'loop/ours':>9}")
        for t in [int(v) for v in args.tokens.split(",")]:
            x = torch.randn(t, d.hidden, dtype=dtype, device=device)
            ms = time_all(fns, x, reps_for(d, t))
            results[key][t] = ms
            print(f"{t:>5} " + " ".join(f"{ms[n]:>14.3f}" for n in fns)
                  + f" {ms['ours (auto)'] / ms['dense FFN']:>9.2f} {ms['authors-loop'] / ms['ours (auto)']:>9.2f}")
    summary = {"host": host_cpu()}  # timings from another CPU are not comparable
    small = results.get("small", {})
    if 8 in small:
        summary["grouped_vs_naive"] = round(small[8]["authors-loop"] / small[8]["ours (auto)"], 3)
    if 64 in small:
        summary["moe_vs_dense_ffn"] = round(small[64]["ours (auto)"] / small[64]["dense FFN"], 3)
    summary["results_ms"] = {k: {str(t): {n: round(v, 4) for n, v in r.items()} for t, r in rs.items()} for k, rs in results.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
