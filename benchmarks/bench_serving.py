"""OpenAI-API serving benchmark for any base URL (in the spirit of `vllm bench serve`).

    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000/v1 --label pesc-serve \
        --concurrency 1,4,16 --max-tokens 128 --out benchmarks/results/pesc-serve.json

For each concurrency level it sends a fixed prompt set (benchmarks/prompts.jsonl) as streamed
chat completions with at most N requests in flight, and measures, client-side:
  request throughput, output tokens/s, TTFT, TPOT (per request: (E2E - TTFT) / (tokens - 1)),
  ITL (gaps between streamed chunks, pooled), E2E latency: mean, p50 and p99.
Output tokens come from the server's usage report when it sends one, else one per content chunk.
`--model NAME` puts NAME in every request's `model` field; `--models a,b,c` instead assigns the
models round-robin over the requests (request i gets models[i % 3]), e.g. a base and its deltas
served by one pesc-serve process (`--adapters`), with one warm-up request per model.
Writes JSON (and a PNG with --plot; see compare.py for several servers side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

try:
    from benchmarks.host_info import host_cpu
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from host_info import host_cpu

PROMPTS = Path(__file__).parent / "prompts.jsonl"


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def load_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, headers: dict) -> RequestResult:
    body = {
        **({"model": model} if model else {}),
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    itls: list[float] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                return RequestResult(False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if text:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            itls.append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, error="no content received")
    n_out = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else chunks
    n_in = int(usage.get("prompt_tokens", 0)) if usage else 0
    return RequestResult(True, first - start, end - start, n_out, n_in, itls)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itls]

    def stats(name: str, xs: list[float]) -> dict:
        return {f"mean_{name}_ms": 1e3 * statistics.fmean(xs) if xs else float("nan"),
                f"p50_{name}_ms": 1e3 * pct(xs, 50), f"p99_{name}_ms": 1e3 * pct(xs, 99)}

    return {
        "concurrency": concurrency,
        "num_requests": len(results),
        "successful": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        **stats("ttft", [r.ttft for r in ok]),
        **stats("tpot", tpots),
        **stats("itl", itls),
        **stats("e2el", [r.e2e for r in ok]),
    }


async def run_level(base_url: str, model: str, prompts: list[str], concurrency: int, num: int, max_tokens: int,
                    api_key: str | None, models: list[str] | None = None) -> dict:
    """One concurrency level; with ``models``, request i asks for models[i % len(models)]."""
    pick = (lambda i: models[i % len(models)]) if models else (lambda i: model)
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def bounded(i: int) -> RequestResult:
            async with sem:
                return await one_request(client, url, pick(i), prompts[i % len(prompts)], max_tokens, headers)

        # one warm-up request (per model) so connection set-up and lazy initialisation are not measured
        for m in (models or [model]):
            await one_request(client, url, m, prompts[0], 4, headers)
        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(num)))
        duration = time.perf_counter() - start
    level = summarize(list(results), duration, concurrency)
    if models:
        level["models"] = {m: sum(1 for i in range(num) if pick(i) == m) for m in models}  # requests per model
    return level


def print_table(label: str, levels: list[dict]) -> None:
    print(f"\n============ Serving Benchmark Result: {label} ============")
    cols = ["concurrency", "successful", "failed", "output_throughput", "request_throughput", "p50_ttft_ms",
            "p99_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms", "p50_e2el_ms"]
    print(" ".join(f"{c:>18}" for c in cols))
    for lv in levels:
        print(" ".join(f"{lv[c]:>18.2f}" if isinstance(lv[c], float) else f"{lv[c]:>18}" for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="")
    ap.add_argument("--models", default="", help="comma list: requests take these models round-robin (overrides --model)")
    ap.add_argument("--label", default="server")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--num-prompts", type=int, default=0, help="requests per level (default: 2 x concurrency, at least 4)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--prompts", type=Path, default=PROMPTS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    prompts = load_prompts(args.prompts)
    models = [m for m in args.models.split(",") if m] or None
    levels = []
    for c in [int(v) for v in args.concurrency.split(",")]:
        num = args.num_prompts or max(4, 2 * c)
        levels.append(asyncio.run(run_level(args.base_url, args.model, prompts, c, num, args.max_tokens, args.api_key,
                                          models)))
        lv = levels[-1]
        print(f"{args.label}: concurrency {c}: {lv['output_throughput']:.1f} tok/s, "
              f"TTFT p50 {lv['p50_ttft_ms']:.0f} ms, TPOT p50 {lv['p50_tpot_ms']:.1f} ms, failed {lv['failed']}", flush=True)
    print_table(args.label, levels)
    # the client's host: on loopback (as run_comparison runs it) also the server's
    result = {"label": args.label, "base_url": args.base_url, "max_tokens": args.max_tokens, "host": host_cpu(),
              **({"models": models} if models else {}), "levels": levels}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if args.plot:
        from benchmarks.compare import plot

        plot([result], args.plot)
    print(json.dumps({"label": args.label, **{f"c{lv['concurrency']}_tok_s": round(lv["output_throughput"], 1) for lv in levels}}))


if __name__ == "__main__":
    main()
