"""Ray Serve benchmark: replicas vs threads on one machine, and the cost of the Serve hop.

    python -m benchmarks.bench_ray --model camelidae --max-tokens 128 --streams 16
    python -m benchmarks.bench_ray --max-tokens 16 --num-prompts 16     # a quick end-to-end check
    python -m benchmarks.bench_ray --only hop --repeats 5               # the hop alone, 5 fresh pairs

Three servers, one after another, each on its own port and (for Serve) its own local Ray
cluster started by ``python -m pesc_serve.ray``:

* ``direct``: ``python -m pesc_serve`` with OMP_NUM_THREADS=2, measured at one stream;
* ``serve-1x2``: one replica with 2 CPUs (2 torch threads), at one stream and at ``--streams``;
* ``serve-2x1``: two replicas with 1 CPU each, at ``--streams``.

Reported: the Serve hop's overhead at one stream (time per output token, serve-1x2 vs direct;
target <= 10 %), and output tokens/s of 2x1 vs 1x2 at ``--streams``.  ``--only hop --repeats N``
measures the first figure alone over N fresh pairs of starts (direct, then Serve) and reports
each pair's overhead and their median: one pair on a 2-core host moves by tens of percent.  On one 2-core machine
two replicas compete for the same cores and memory bandwidth as two threads do, so the
second figure is about the scheduling, not about scale: replicas pay off across machines.
Client-side measurements come from benchmarks/bench_serving.py; results go to JSON with the
host's CPU (benchmarks/host_info.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

try:
    from benchmarks.bench_serving import PROMPTS, load_prompts, run_level
    from benchmarks.host_info import host_cpu
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from bench_serving import PROMPTS, load_prompts, run_level
    from host_info import host_cpu

RESULTS = Path(__file__).parent / "results"


@contextmanager
def server(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None,
           ready_s: float = 900) -> Iterator[dict]:
    """Run ``cmd`` until its /health answers 200; yield that answer; SIGTERM it (and wait) after."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        try:
            deadline = time.monotonic() + ready_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}; see {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[2]} not healthy after {ready_s:.0f} s; see {log}")
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            yield r.json()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=180)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# Which process a CPU second went to, by its command line (Ray names its actors' processes).
_PROCESS_KINDS = (("PescEngine", "engine replica"), ("OpenAIIngress", "ingress"), ("ProxyActor", "proxy"),
                  ("ServeController", "controller"), ("pesc_serve --model", "engine (direct)"),
                  ("pesc_serve.ray", "serve driver"), ("DashboardAgent", "dashboard agent"),
                  ("RuntimeEnvAgent", "runtime env agent"), ("log_monitor", "log monitor"),
                  ("gcs_server", "gcs"), ("raylet", "raylet"))


def process_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) each kind of process has used so far, from /proc; the rest of
    the host's processes are summed as "other" (the benchmark's own client among them)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = f"{stat.split('(', 1)[1].rsplit(')', 1)[0]} {cmd}"
        kind = next((k for pattern, k in _PROCESS_KINDS if pattern in name), "other")
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def measure(port: int, args: argparse.Namespace, prompts: list[str], concurrency: int) -> dict:
    """One load level; with it, the CPU seconds each kind of process used meanwhile: on a host
    whose cores the engine's OpenMP team fills, every other process's CPU time stalls the team."""
    num = args.num_prompts or max(4, 2 * concurrency)
    before, t0 = process_cpu_seconds(), time.monotonic()
    level = asyncio.run(run_level(f"http://127.0.0.1:{port}/v1", "", prompts, concurrency, num, args.max_tokens, None))
    after, wall = process_cpu_seconds(), time.monotonic() - t0
    level["wall_s"] = round(wall, 2)
    level["cpu_s_by_process"] = {k: round(v - before.get(k, 0.0), 2) for k, v in sorted(after.items())
                                 if v - before.get(k, 0.0) >= 0.01}
    print(f"  {concurrency:>2} stream(s): {level['output_throughput']:7.1f} tok/s, TPOT mean "
          f"{level['mean_tpot_ms']:.1f} ms (p50 {level['p50_tpot_ms']:.1f}), failed {level['failed']}; CPU s over "
          f"{wall:.1f} s: {level['cpu_s_by_process']}", flush=True)
    return level


def serve_cmd(args: argparse.Namespace, port: int, replicas: int, cpus: int) -> list[str]:
    interval = [] if args.stream_interval_ms is None else ["--stream-interval-ms", str(args.stream_interval_ms)]
    return [sys.executable, "-m", "pesc_serve.ray", "--model", args.model, "--port", str(port),
            "--num-replicas", str(replicas), "--num-cpus-per-replica", str(cpus), "--log-level", "warning",
            *interval, *args.server_args]


def direct_cmd(args: argparse.Namespace, port: int) -> list[str]:
    return [sys.executable, "-m", "pesc_serve", "--model", args.model, "--port", str(port),
            "--log-level", "warning", *args.server_args]


def hop_pair(args: argparse.Namespace, prompts: list[str], logs: Path, i: int) -> dict:
    """One fresh direct server, then one fresh one-replica Serve app: one-stream TPOT of each."""
    print(f"pair {i + 1}/{args.repeats}: direct, then serve-1x2", flush=True)
    with server(direct_cmd(args, args.port), args.port, logs / f"direct-{i}.log", env={"OMP_NUM_THREADS": "2"}):
        direct = measure(args.port, args, prompts, 1)
    with server(serve_cmd(args, args.port + 1, 1, 2), args.port + 1, logs / f"serve-1x2-{i}.log"):
        served = measure(args.port + 1, args, prompts, 1)
    overhead = 100 * (served["mean_tpot_ms"] - direct["mean_tpot_ms"]) / direct["mean_tpot_ms"]
    print(f"  overhead {overhead:+.1f}%", flush=True)
    return {"direct": direct, "serve": served, "overhead_pct": overhead}


def scaling(args: argparse.Namespace, prompts: list[str], logs: Path, runs: dict) -> dict:
    """Direct and serve-1x2 at one stream, then 1x2 against 2x1 at ``--streams``."""
    print("direct: python -m pesc_serve, 2 threads", flush=True)
    with server(direct_cmd(args, args.port), args.port, logs / "direct.log", env={"OMP_NUM_THREADS": "2"}):
        runs["direct"] = {"threads": 2, "levels": [measure(args.port, args, prompts, 1)]}

    print("serve-1x2: one replica, 2 CPUs", flush=True)
    with server(serve_cmd(args, args.port + 1, 1, 2), args.port + 1, logs / "serve-1x2.log") as health:
        runs["serve-1x2"] = {"replicas": health["replicas"], "levels": [
            measure(args.port + 1, args, prompts, 1), measure(args.port + 1, args, prompts, args.streams)]}

    print("serve-2x1: two replicas, 1 CPU each", flush=True)
    with server(serve_cmd(args, args.port + 2, 2, 1), args.port + 2, logs / "serve-2x1.log") as health:
        runs["serve-2x1"] = {"replicas": health["replicas"], "levels": [
            measure(args.port + 2, args, prompts, args.streams)]}

    tpot_direct = runs["direct"]["levels"][0]["mean_tpot_ms"]
    tpot_serve = runs["serve-1x2"]["levels"][0]["mean_tpot_ms"]
    tok_1x2 = runs["serve-1x2"]["levels"][1]["output_throughput"]
    tok_2x1 = runs["serve-2x1"]["levels"][0]["output_throughput"]
    return {
        "serve_hop_tpot_overhead_pct": 100 * (tpot_serve - tpot_direct) / tpot_direct,
        "tpot_ms_direct_1_stream": tpot_direct,
        "tpot_ms_serve_1_stream": tpot_serve,
        f"tok_s_1x2_at_{args.streams}": tok_1x2,
        f"tok_s_2x1_at_{args.streams}": tok_2x1,
        "ratio_2x1_over_1x2": tok_2x1 / tok_1x2 if tok_1x2 else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="camelidae")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams of the scaling comparison")
    ap.add_argument("--num-prompts", type=int, default=0, help="requests per level (default: 2 x streams, at least 4)")
    ap.add_argument("--port", type=int, default=8300, help="first of three ports")
    ap.add_argument("--only", choices=("all", "hop"), default="all",
                    help="hop: only the one-stream Serve hop, over --repeats fresh pairs of starts")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of fresh starts for --only hop")
    ap.add_argument("--stream-interval-ms", type=float, default=None,
                    help="the Serve app's --stream-interval-ms (default: its own default)")
    ap.add_argument("--prompts", type=Path, default=PROMPTS)
    ap.add_argument("--out", type=Path, default=None, help="default: results/ray.json (ray_hop.json with --only hop)")
    ap.add_argument("--logs", type=Path, default=None, help="server logs directory (default: a new temporary one)")
    ap.add_argument("server_args", nargs="*", help="more server flags, after --")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    args.out = args.out or RESULTS / ("ray_hop.json" if args.only == "hop" else "ray.json")
    prompts = load_prompts(args.prompts)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench_ray-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"server logs in {logs}", flush=True)
    runs: dict[str, dict] = {}

    if args.only == "hop":
        pairs = [hop_pair(args, prompts, logs, i) for i in range(args.repeats)]
        summary = {"serve_hop_tpot_overhead_pct_median": statistics.median(p["overhead_pct"] for p in pairs),
                   "serve_hop_tpot_overhead_pct_each": [round(p["overhead_pct"], 1) for p in pairs]}
        runs["hop_pairs"] = pairs
    else:
        summary = scaling(args, prompts, logs, runs)
    result = {"model": args.model, "max_tokens": args.max_tokens, "streams": args.streams, "only": args.only,
              "server_args": args.server_args, "stream_interval_ms": args.stream_interval_ms, "host": host_cpu(),
              "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
