"""Side-by-side table and PNG plot of several bench_serving.py result files.

    python benchmarks/compare.py benchmarks/results/*.json --png benchmarks/results/serving.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        conc = [lv["concurrency"] for lv in r["levels"]]
        axes[0].plot(conc, [lv["output_throughput"] for lv in r["levels"]], marker="o", label=r["label"])
        axes[1].plot(conc, [lv["p50_ttft_ms"] for lv in r["levels"]], marker="o", label=r["label"])
        axes[2].plot(conc, [lv["p50_tpot_ms"] for lv in r["levels"]], marker="o", label=r["label"])
    for ax, title in zip(axes, ("output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    hosts = sorted({r["host"]["model_name"] for r in results if r.get("host")})
    if hosts:  # figures from different CPUs do not compare: the plot names its own
        fig.suptitle(f"{' / '.join(hosts)}, {results[0]['host'].get('usable_cpus') or '?'} CPUs")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def table(results: list[dict]) -> str:
    conc = sorted({lv["concurrency"] for r in results for lv in r["levels"]})
    lines = ["| server | " + " | ".join(f"{c} stream{'s' if c > 1 else ''} tok/s (TTFT p50 ms)" for c in conc) + " |",
             "|---|" + "---|" * len(conc)]
    for r in results:
        by = {lv["concurrency"]: lv for lv in r["levels"]}
        cells = [f"{by[c]['output_throughput']:.1f} ({by[c]['p50_ttft_ms']:.0f})" if c in by else "-" for c in conc]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    results = [json.loads(p.read_text()) for p in args.results]
    print(table(results))
    if args.png:
        plot(results, args.png)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
