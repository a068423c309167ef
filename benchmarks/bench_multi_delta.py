"""Multi-model serving: many deltas over one base in ONE pesc-serve process, their mixed-batch
throughput and the memory each delta adds.

    python -m benchmarks.bench_multi_delta                       # both parts, writes results/multi_delta.json
    python -m benchmarks.bench_multi_delta --only mix --max-tokens 128 --repeats 2
    python -m benchmarks.bench_multi_delta --only memory --delta-counts 0,1,2,4

Three extra deltas (d2, d3, d4) of camelidae's exact shapes are written under a temp directory:
camelidae's config.json and its tensors plus seeded Gaussian noise (routers: noise of the
tensor's own std, so routing differs; expert adapters and LoRA: a tenth of it), kept bf16.

mix     One server, ``--model smollm2 --adapters camelidae=camelidae d2=... d3=... d4=...``
        (default flags otherwise).  After a warm-up of both configurations, 16 concurrent
        streamed chat completions (benchmarks/prompts.jsonl, ignore_eos, temperature 0,
        --max-tokens each, 2 x 16 requests) run (i) all on ``camelidae`` and (ii) round-robin
        over [smollm2, camelidae, d2, d3, d4]; the two alternate in order over --repeats.
        Reported: output tokens/s of each and the median of the per-repeat ratios (ii)/(i)
        (target >= 0.85: a batch of five models costs little more than one of a single model).
memory  Servers with ``--model smollm2`` and 0, 1, 2, 4 deltas, each with the same small
        ``--kv-cache-memory`` (the KV cache is calloc'd: untouched pages cost nothing, and the
        same budget keeps its bookkeeping equal).  After one short request to each served model
        (lazily touched pages count), VmRSS from /proc/PID/status.  Reported: MiB added per
        delta vs the delta's file size (target <= 1.5x), and the RSS of a separate process
        serving just ``--model camelidae`` (the cost of one process per delta).

Every result carries the host CPU and the exact command; server logs go to results/multi-delta-*.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.bench_serving import PROMPTS, load_prompts, run_level
from benchmarks.host_info import host_cpu
from benchmarks.run_comparison import PY, RESULTS, peak_rss_mib, serving

CAMELIDAE_DIR = Path(__file__).resolve().parents[1] / "pesc_serve" / "assets" / "camelidae-smol-8x135m"
WEIGHTS = "adapter_model.safetensors"
EXTRA_DELTAS = ("d2", "d3", "d4")
DELTAS = ("camelidae", *EXTRA_DELTAS)  # in the order --adapters lists them
BASE = "smollm2"
PORT = 8310
ROUTER_NOISE, OTHER_NOISE = 1.0, 0.1  # noise std relative to each tensor's own std


def make_deltas(root: Path, seed: int = 0) -> dict[str, Path]:
    """d2..d4 under root: camelidae's config and tensors plus seeded noise, bf16 like the original."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~900 small tensors: OpenMP fork/join beside a busy process cost 60 s
    try:
        with safe_open(str(CAMELIDAE_DIR / WEIGHTS), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k).float() for k in sorted(f.keys())}
            dtypes = {k: f.get_slice(k).get_dtype() for k in tensors}
        if set(dtypes.values()) != {"BF16"}:
            raise RuntimeError(f"expected camelidae's tensors in bf16, got {sorted(set(dtypes.values()))}")
        stds = {k: t.std().item() for k, t in tensors.items()}
        out = {"camelidae": CAMELIDAE_DIR}
        for j, name in enumerate(EXTRA_DELTAS, start=1):
            d = root / name
            d.mkdir(parents=True)
            shutil.copy(CAMELIDAE_DIR / "config.json", d / "config.json")
            g = torch.Generator().manual_seed(seed * 1000 + j)
            noisy = {}
            for key, t in tensors.items():
                scale = ROUTER_NOISE if key.endswith("router.weight") else OTHER_NOISE
                noise = torch.randn(t.shape, generator=g).mul_(stds[key] * scale)
                noisy[key] = (t + noise).to(torch.bfloat16).contiguous()
            save_file(noisy, str(d / WEIGHTS), metadata=metadata)
            out[name] = d
        return out
    finally:
        torch.set_num_threads(threads)


def router_agreement(paths: dict[str, Path], tokens: int = 512, seed: int = 0) -> dict[str, float]:
    """Per extra delta: the mean share of (token, layer) top-k sets equal to camelidae's, for random
    unit-variance inputs (a rough check that the noise changes routing, not a real-data figure)."""
    import torch
    from safetensors import safe_open

    topk = json.loads((CAMELIDAE_DIR / "config.json").read_text())["topk"]

    def routers(p: Path) -> list[torch.Tensor]:
        with safe_open(str(p / WEIGHTS), "pt") as f:
            keys = sorted((k for k in f.keys() if k.endswith("router.weight")), key=lambda k: int(k.split(".")[2]))
            return [f.get_tensor(k).float() for k in keys]

    ref = routers(paths["camelidae"])
    x = torch.randn(tokens, ref[0].shape[1], generator=torch.Generator().manual_seed(seed))
    pick = [torch.topk(x @ r.t(), topk, dim=-1).indices.sort(dim=-1).values for r in ref]
    agree = {}
    for name in EXTRA_DELTAS:
        other = [torch.topk(x @ r.t(), topk, dim=-1).indices.sort(dim=-1).values for r in routers(paths[name])]
        agree[name] = round(statistics.fmean((a == b).all(dim=-1).float().mean().item() for a, b in zip(pick, other)), 3)
    return agree


def vm_status(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def served_models(port: int) -> list[str]:
    return [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"]]


def warm_each(port: int, models: list[str], max_tokens: int = 4) -> None:
    """One short non-streamed request per model (touches each delta's weights and the KV path)."""
    for m in models:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=600, json={
            "model": m, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request to {m!r}: HTTP {r.status_code}: {r.text[:200]}")


def per_model_tokens(port: int) -> dict[str, float]:
    """pesc:generation_tokens by model label, from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith("pesc:generation_tokens_total{"):
            labels, _, value = line.rpartition(" ")
            model = labels.split('model="', 1)[1].split('"', 1)[0]
            out[model] = float(value)
    return out


def adapter_args(paths: dict[str, Path], n: int) -> list[str]:
    names = DELTAS[:n]
    return ["--adapters", *[f"{m}={'camelidae' if m == 'camelidae' else paths[m]}" for m in names]] if n else []


def run_mix(paths: dict[str, Path], args: argparse.Namespace) -> dict:
    cmd = [PY, "-m", "pesc_serve", "--model", BASE, "--port", str(PORT), *adapter_args(paths, len(DELTAS))]
    configs = {"single": ["camelidae"], "mix": [BASE, *DELTAS]}
    prompts = load_prompts(PROMPTS)
    num = args.num_prompts or 2 * args.streams
    base_url = f"http://127.0.0.1:{PORT}/v1"

    def level(which: str, max_tokens: int) -> dict:
        lv = asyncio.run(run_level(base_url, "", prompts, args.streams, num, max_tokens, None, models=configs[which]))
        if lv["failed"]:
            raise RuntimeError(f"{which}: {lv['failed']} of {num} requests failed: {lv['errors']}")
        return lv

    runs = []
    with serving("multi-delta-mix", cmd, PORT) as proc:
        listed = served_models(PORT)
        missing = [m for m in configs["mix"] if m not in listed]
        if missing:
            raise RuntimeError(f"/v1/models lacks {missing} (lists {listed})")
        for which in configs:  # warm-up: both configurations once, short, not measured
            level(which, min(8, args.max_tokens))
        for r in range(args.repeats):
            order = ["single", "mix"] if r % 2 == 0 else ["mix", "single"]
            got = {}
            for which in order:
                lv = level(which, args.max_tokens)
                got[which] = lv
                print(f"  repeat {r + 1}: {which:>6}: {lv['output_throughput']:.1f} tok/s "
                      f"(TPOT p50 {lv['p50_tpot_ms']:.1f} ms)", flush=True)
            runs.append({"repeat": r + 1, "order": order, "single": got["single"], "mix": got["mix"],
                         "ratio": got["mix"]["output_throughput"] / got["single"]["output_throughput"]})
        tokens_by_model = per_model_tokens(PORT)
        peak = peak_rss_mib(proc.pid)
    ratios = [r["ratio"] for r in runs]
    return {
        "server_command": shlex.join(["python", *cmd[1:]] if cmd[0] == PY else cmd),
        "served_models": listed,
        "streams": args.streams, "requests_per_run": num, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "single_models": configs["single"], "mix_models": configs["mix"],
        "single_tok_s": [r["single"]["output_throughput"] for r in runs],
        "mix_tok_s": [r["mix"]["output_throughput"] for r in runs],
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "target_ratio": 0.85,
        "generation_tokens_by_model": tokens_by_model,  # server-side, warm-up included
        "peak_rss_mib": peak,
        "runs": runs,
    }


def measure_rss(label: str, cmd: list[str], port: int, models: list[str]) -> dict:
    with serving(label, cmd, port) as proc:
        warm_each(port, models)
        time.sleep(1)
        rss, hwm = vm_status(proc.pid, "VmRSS"), vm_status(proc.pid, "VmHWM")
    return {"server_command": shlex.join(["python", *cmd[1:]] if cmd[0] == PY else cmd), "models": models,
            "rss_mib": rss, "peak_rss_mib": hwm}


def run_memory(paths: dict[str, Path], args: argparse.Namespace) -> dict:
    kv = ["--kv-cache-memory", str(args.kv_cache_memory)]
    counts = sorted({int(c) for c in args.delta_counts.split(",")})
    if 0 not in counts or max(counts) > len(DELTAS):
        raise SystemExit(f"--delta-counts must include 0 and stay <= {len(DELTAS)}")
    by_count = {}
    for i, n in enumerate(counts):
        port = PORT + 1 + i
        cmd = [PY, "-m", "pesc_serve", "--model", BASE, "--port", str(port), *kv, *adapter_args(paths, n)]
        by_count[n] = measure_rss(f"multi-delta-mem-{n}", cmd, port, [BASE, *DELTAS[:n]])
        print(f"  {n} deltas: VmRSS {by_count[n]['rss_mib']:.1f} MiB", flush=True)
    port = PORT + 1 + len(counts)
    separate = measure_rss("multi-delta-mem-separate",
                           [PY, "-m", "pesc_serve", "--model", "camelidae", "--port", str(port), *kv], port, ["camelidae"])
    print(f"  separate --model camelidae process: VmRSS {separate['rss_mib']:.1f} MiB", flush=True)
    file_mib = {m: (paths[m] / WEIGHTS).stat().st_size / 2**20 for m in DELTAS}
    base = by_count[0]["rss_mib"]
    added = {n: (r["rss_mib"] - base) / n for n, r in by_count.items() if n}
    ns = [n for n in by_count]
    if len(ns) >= 2:  # least-squares slope of RSS over the delta count
        mx, my = statistics.fmean(ns), statistics.fmean(by_count[n]["rss_mib"] for n in ns)
        slope = sum((n - mx) * (by_count[n]["rss_mib"] - my) for n in ns) / sum((n - mx) ** 2 for n in ns)
    else:
        slope = float("nan")
    top = max(counts)
    per_delta = added.get(top, float("nan"))
    return {
        "kv_cache_memory_gib": args.kv_cache_memory,
        "delta_file_mib": file_mib["camelidae"],
        "delta_file_mib_by_name": file_mib,
        "by_delta_count": {str(n): r for n, r in by_count.items()},
        "added_mib_per_delta_by_count": {str(n): v for n, v in added.items()},
        "mib_per_delta": per_delta,  # (RSS with the most deltas - RSS with none) / their number
        "mib_per_delta_fit": slope,
        "per_delta_vs_file": per_delta / file_mib["camelidae"],
        "target_per_delta_vs_file": 1.5,
        "separate_camelidae_process": separate,
        "separate_process_vs_in_process_delta": separate["rss_mib"] / per_delta if per_delta == per_delta and per_delta > 0 else None,
    }


def print_tables(result: dict) -> None:
    mix, mem = result.get("mix"), result.get("memory")
    if mix:
        print(f"\nThroughput, one server, {mix['streams']} streams, {mix['requests_per_run']} requests x "
              f"{mix['max_tokens']} tokens (output tok/s)")
        print(f"{'repeat':>6} {'order':>13} {'camelidae':>10} {'5-model mix':>12} {'mix/single':>10}")
        for r in mix["runs"]:
            print(f"{r['repeat']:>6} {'>'.join(r['order']):>13} {r['single']['output_throughput']:>10.1f} "
                  f"{r['mix']['output_throughput']:>12.1f} {r['ratio']:>10.3f}")
        print(f"median mix/single {mix['median_ratio']:.3f} (target >= {mix['target_ratio']})")
    if mem:
        print(f"\nMemory, VmRSS after one request per model, --kv-cache-memory {mem['kv_cache_memory_gib']}")
        print(f"{'deltas':>6} {'VmRSS MiB':>10} {'added/delta':>12}")
        for n, r in mem["by_delta_count"].items():
            added = mem["added_mib_per_delta_by_count"].get(n)
            print(f"{n:>6} {r['rss_mib']:>10.1f} {'' if added is None else f'{added:.1f}':>12}")
        print(f"per delta {mem['mib_per_delta']:.1f} MiB (fit {mem['mib_per_delta_fit']:.1f}) for a "
              f"{mem['delta_file_mib']:.1f} MiB file = {mem['per_delta_vs_file']:.2f}x (target <= "
              f"{mem['target_per_delta_vs_file']}x)")
        sep = mem["separate_camelidae_process"]["rss_mib"]
        print(f"a separate --model camelidae process: {sep:.1f} MiB"
              + (f" ({mem['separate_process_vs_in_process_delta']:.1f}x a delta in the shared process)"
                 if mem["separate_process_vs_in_process_delta"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("mix", "memory"), default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams in the mix part")
    ap.add_argument("--num-prompts", type=int, default=0, help="requests per mix run (default: 2 x streams)")
    ap.add_argument("--delta-counts", default="0,1,2,4", help="memory part: servers with this many deltas")
    ap.add_argument("--kv-cache-memory", type=float, default=0.5, help="memory part: --kv-cache-memory (GiB) of each server")
    ap.add_argument("--seed", type=int, default=0, help="noise seed of d2..d4")
    ap.add_argument("--out", type=Path, default=RESULTS / "multi_delta.json")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", *sys.orig_argv[1:]])
    result = {"host": host_cpu(), "command": command}
    with tempfile.TemporaryDirectory(prefix="pesc-multi-delta-") as tmp:
        paths = make_deltas(Path(tmp), args.seed)
        result["deltas"] = {"extra": list(EXTRA_DELTAS), "router_noise_rel_std": ROUTER_NOISE,
                            "other_noise_rel_std": OTHER_NOISE, "seed": args.seed,
                            "router_top_k_agreement_with_camelidae_random_inputs": router_agreement(paths)}
        if args.only in (None, "mix"):
            print("mix:", flush=True)
            result["mix"] = {"command": command, **run_mix(paths, args)}
        if args.only in (None, "memory"):
            print("memory:", flush=True)
            result["memory"] = {"command": command, **run_memory(paths, args)}
    if args.only and args.out.exists():  # keep the other part of an earlier run on this host
        try:
            old = json.loads(args.out.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        other = "memory" if args.only == "mix" else "mix"
        if other in old and old.get("host") == result["host"]:
            result[other] = old[other]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_tables(result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
