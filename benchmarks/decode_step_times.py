"""Where one stream's decode time goes, step by step, inside one process (issue #14, item 0).

The stability benchmark (``run_comparison --only stability``) sees one-stream tok/s move by
15-20% between fresh server starts.  This asks the question underneath: does the speed belong to
the process (fixed at start: memory placement, thread placement), or does it move inside one
process too?  One engine on its own engine thread, as the server runs it, no HTTP; several
greedy runs of N tokens each; per run the tok/s, the step-time percentiles and the mean step
time per fifth of the run (the context grows, so attention's share grows with it).

    python -m benchmarks.decode_step_times --runs 4 --tokens 512    # benchmarks/results/decode_step_times.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pesc_serve.__main__ as cli  # first: it sets the OpenMP spin policy before torch loads
from benchmarks.host_info import host_cpu
from pesc_serve.allocator import freeze_startup_objects, keep_freed_buffers

RESULTS = Path(__file__).resolve().parent / "results"


def _run(engine, request_id: str, tokens: int) -> list[float]:
    """Seconds per engine step of one greedy request, the first two steps (prefill) left out."""
    from pesc_serve.engine.request import SamplingParams

    engine.add_request(request_id, list(range(100, 130)),
                       SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[2:]


def summarise(times: list[float]) -> dict:
    """tok/s, step-time percentiles (ms) and the mean step time per fifth of the run."""
    ms = sorted(t * 1e3 for t in times)
    fifth = max(1, len(times) // 5)
    return {
        "tok_s": round(len(times) / sum(times), 1),
        "median_ms": round(statistics.median(ms), 2),
        "p10_ms": round(ms[len(ms) // 10], 2),
        "p90_ms": round(ms[9 * len(ms) // 10], 2),
        "max_ms": round(ms[-1], 1),
        "fifths_ms": [round(1e3 * statistics.fmean(times[k * fifth:(k + 1) * fifth]), 2) for k in range(5)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="camelidae")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=RESULTS / "decode_step_times.json")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.tokens < 8:
        ap.error("--runs must be >= 1 and --tokens >= 8")

    from pesc_serve.engine.engine_thread import EngineThread
    from pesc_serve.launcher import build_engine

    load, engine_cfg, _ = cli.configs_from_args(cli.build_parser().parse_args(["--model", args.model]))
    keep_freed_buffers()  # the server's process settings (pesc_serve/__main__.py)
    thread = EngineThread()
    engine = thread.call(lambda: build_engine(load, engine_cfg))
    freeze_startup_objects()
    thread.call(lambda: _run(engine, "warm-up", 64))
    runs = []
    for i in range(args.runs):
        row = summarise(thread.call(lambda i=i: _run(engine, f"run-{i}", args.tokens)))
        runs.append(row)
        print(json.dumps(row), flush=True)
    rates = [r["tok_s"] for r in runs]
    report = {"host": host_cpu(), "model": args.model, "tokens": args.tokens, "runs": runs,
              "spread": round((max(rates) - min(rates)) / statistics.median(rates), 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"tok/s {min(rates)}-{max(rates)} (spread {report['spread']:.0%} of the median) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
