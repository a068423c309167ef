"""`make bench`: pesc-serve vs its peers in one run, then the PESC layer benchmark.

Servers, one at a time, on loopback:
  pesc-serve      python -m pesc_serve --model camelidae          (default flags)
  llama.cpp       its own llama-server on the dense base GGUF (Q4_1), 2 threads, -np 16
  hf-reference    the authors' way (transformers + per-expert loop + generate, one at a time)
Each is measured with bench_serving.py (streamed chat completions, 256 new tokens, ignore_eos)
at 1 and 16 concurrent streams; peak memory (VmHWM) of each server process is recorded.
Then a long-context check (64 concurrent ~1k-token sequences on pesc-serve, KV usage from
/metrics) and bench_moe_layer.py.  Writes benchmarks/results/{*.json,serving.png,summary.json}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LLAMA_SERVER = ROOT / "benchmarks" / "peers" / "_build" / "llama-server"
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


def bench(label: str, port: int, concurrency: str, max_tokens: int, num_prompts: int = 0) -> dict:
    out = RESULTS / f"{label}.json"
    cmd = [PY, "-m", "benchmarks.bench_serving", "--base-url", f"http://127.0.0.1:{port}/v1", "--label", label,
           "--concurrency", concurrency, "--max-tokens", str(max_tokens), "--out", str(out)]
    if num_prompts:
        cmd += ["--num-prompts", str(num_prompts)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def serve_and_bench(label: str, cmd: list[str], port: int, concurrency: str, max_tokens: int, num_prompts: int = 0,
                    health: str = "/health", extra=None, env: dict[str, str] | None = None) -> dict:
    log = open(RESULTS / f"{label}.log", "w")
    # Each server keeps its own OpenMP defaults: a PASSIVE wait policy forced on all of them
    # (as earlier versions of this script did) cut llama.cpp to a third of its speed.
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**clean, **(env or {})})
    try:
        wait_healthy(f"http://127.0.0.1:{port}{health}", proc)
        result = bench(label, port, concurrency, max_tokens, num_prompts)
        if extra is not None:
            result.update(extra(port))
        result["peak_rss_mib"] = peak_rss_mib(proc.pid)
    finally:
        stop(proc)
        log.close()
    (RESULTS / f"{label}.json").write_text(json.dumps(result, indent=2))
    return result


def long_context_check(port: int) -> dict:
    """64 concurrent sequences of ~1k tokens; report success and the peak KV usage seen."""
    import asyncio

    filler = " ".join(f"word{i % 97}" for i in range(300))  # ~900-token prompts, ~1k with the reply
    body = {"messages": [{"role": "user", "content": "Summarise: " + filler}], "max_tokens": 64,
            "temperature": 0, "ignore_eos": True}
    peak = {"kv": 0.0, "running": 0}

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=1800) as client:
            async def one() -> int:
                r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                return r.json()["usage"]["total_tokens"] if r.status_code == 200 else -r.status_code

            async def watch() -> None:
                while True:
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                    for line in text.splitlines():
                        if line.startswith("pesc:kv_cache_usage_perc "):
                            peak["kv"] = max(peak["kv"], float(line.split()[1]))
                        if line.startswith("pesc:num_requests_running "):
                            peak["running"] = max(peak["running"], int(float(line.split()[1])))
                    await asyncio.sleep(0.5)

            w = asyncio.create_task(watch())
            totals = await asyncio.gather(*(one() for _ in range(64)))
            w.cancel()
            return list(totals)

    start = time.perf_counter()
    totals = asyncio.run(run())
    return {"long_context": {"requests": 64, "ok": sum(t > 0 for t in totals), "tokens_per_sequence": max(totals),
                             "peak_kv_cache_usage": peak["kv"], "peak_running": peak["running"],
                             "duration_s": time.perf_counter() - start}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--skip", default="", help="comma list of: llama.cpp,hf-reference,long-context,moe-layer")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    RESULTS.mkdir(parents=True, exist_ok=True)
    env_threads = str(os.cpu_count() or 2)
    results = []
    ours = serve_and_bench(
        "pesc-serve", [PY, "-m", "pesc_serve", "--model", "camelidae", "--port", "8200"], 8200, "1,16", args.max_tokens,
        extra=None if "long-context" in skip else long_context_check,
    )
    results.append(ours)
    if "llama.cpp" not in skip:
        subprocess.run(["bash", str(ROOT / "benchmarks/peers/setup_llama_cpp.sh")], check=True, env={**os.environ, "PYTHON": PY})
        from pesc_serve.registry import smollm2_gguf_path

        results.append(serve_and_bench(
            "llama.cpp", [str(LLAMA_SERVER), "-m", str(smollm2_gguf_path()), "--port", "8201", "-t", env_threads,
                          "-np", "16", "-c", str(16 * 1024), "--no-warmup"], 8201, "1,16", args.max_tokens))
    if "hf-reference" not in skip:
        results.append(serve_and_bench(
            "hf-reference", [PY, "benchmarks/peers/hf_reference_server.py", "--model", "camelidae", "--port", "8202"],
            8202, "1,16", args.max_tokens, num_prompts=16,
            env={"GOMP_SPINCOUNT": PESC_SERVE_SPINCOUNT}))  # the OpenMP setting pesc-serve's CLI uses
    subprocess.run([PY, "-m", "benchmarks.compare", *[str(RESULTS / f"{r['label']}.json") for r in results],
                    "--png", str(RESULTS / "serving.png")], check=True, cwd=ROOT)
    summary = {"max_tokens": args.max_tokens}
    by = {r["label"]: {lv["concurrency"]: lv["output_throughput"] for lv in r["levels"]} for r in results}
    summary["tok_s"] = by
    summary["peak_rss_mib"] = {r["label"]: r.get("peak_rss_mib") for r in results}
    if "llama.cpp" in by:
        summary["single_stream_vs_llama_cpp"] = by["pesc-serve"][1] / by["llama.cpp"][1]
        summary["16_streams_vs_llama_cpp"] = by["pesc-serve"][16] / by["llama.cpp"][16]
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
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
