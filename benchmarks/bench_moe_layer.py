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
from pesc_serve.layers.pesc_mlp import DISPATCHES, ExpertSet, PescMLP, choose_dispatch, route


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


def build(d: Dims, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[PescMLP, ExpertSet]:
    """A PescMLP serving one delta (slot 0) of random experts, and those experts for the strategies.

    The layer and the strategies read the same tensors through two :class:`ExpertSet` objects:
    installing the C++ kernel hands the layer's set over to its packed copy (dropping the set's
    own down/up), and the strategies' set must keep them.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        mlp = PescMLP(d.hidden, d.ffn)
        router = torch.empty(d.experts, d.hidden)
        down = torch.empty(d.experts, d.adapter, d.hidden)
        up = torch.empty(d.experts, d.hidden, d.adapter)
    with torch.no_grad():
        for p in [*mlp.parameters(), router, down, up]:
            p.normal_(0, p.shape[-1] ** -0.5)
    mlp = mlp.to(dtype).eval()
    router, down, up = (t.to(dtype).contiguous() for t in (router, down, up))
    experts = ExpertSet(router, down, up, d.topk)
    mlp.experts[0] = ExpertSet(router, down, up, d.topk)  # slot 0: what a request without deltas runs
    experts.up_t  # derived once here, as the server's first call would, not inside the timings
    return mlp, experts


def authors_loop(mlp: PescMLP, experts: ExpertSet, x: torch.Tensor) -> torch.Tensor:
    """Transcription of the reference modeling code's MoE adapter (flat tokens)."""
    f = mlp.ffn(x)
    logits = F.linear(x, experts.router)
    weights, selected = torch.topk(logits, experts.topk, dim=-1)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(x.dtype)
    flat_idx = selected.view(-1)
    h = f.repeat_interleave(experts.topk, dim=0)
    y = torch.empty_like(h)
    for e in range(experts.num_experts):
        mask = flat_idx == e
        y[mask] = h[mask] + F.gelu(h[mask] @ experts.down[e].t()) @ experts.up[e].t()
    return (y.view(*weights.shape, -1) * weights.unsqueeze(-1)).sum(dim=1)


def strategy(mlp: PescMLP, experts: ExpertSet, name: str):
    def fwd(x: torch.Tensor) -> torch.Tensor:
        f = mlp.ffn(x)
        p, idx = route(x, experts.router, experts.topk)
        run = DISPATCHES[name] if name != "auto" else choose_dispatch(
            "auto", x.shape[0], experts.num_experts, experts.topk, x.is_cpu)
        return run(f, experts.down, experts.up_t, p, idx)

    return fwd


def install_kernels(mlp: PescMLP, dtype: torch.dtype) -> bool:
    """What the server does on CPU (kernels/cpu_kernels.py's CpuKernels): the C++ grouped adapters,
    over a one-slot AdapterStack, when the extension builds and the delta fits the bf16 kernel."""
    if mlp.ffn.gate_up_proj.weight.device.type != "cpu":
        return False
    from pesc_serve.kernels.build import load_extension
    from pesc_serve.kernels.cpu_kernels import GroupedAdapters, grouped_adapters_fit

    try:
        ext = load_extension()
    except Exception as exc:  # no compiler: ours stays on the PyTorch dispatch, as the server would
        print(f"C++ kernels unavailable ({exc}); 'ours' runs the PyTorch dispatch")
        return False
    if not ext.have_bf16_gemm() or not grouped_adapters_fit(mlp, dtype):
        return False  # the server keeps such a delta on the PyTorch dispatch too
    stack = ext.AdapterStack()
    mlp.grouped_adapters = GroupedAdapters(ext, stack)
    for slot, experts in mlp.experts.items():
        experts.keep_only_packed(ext.PackedAdapters(experts.router, experts.down, experts.up, experts.topk))
        stack.set(slot, experts.packed)
        mlp.packed_slots.add(slot)
    return True


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
        mlp, experts = build(d, dtype, device)
        kernels = install_kernels(mlp, dtype)
        fns = {
            "authors-loop": lambda x, m=mlp, e=experts: authors_loop(m, e, x),
            "dense-stacked": strategy(mlp, experts, "dense"),
            "grouped": strategy(mlp, experts, "grouped"),
            "gather": strategy(mlp, experts, "gather"),
            "padded": strategy(mlp, experts, "padded"),
            "PyTorch auto": strategy(mlp, experts, "auto"),
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
