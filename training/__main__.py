"""``python -m training craft|train|eval``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("craft", help="upcycle a dense model into a PESC delta checkpoint")
    c.add_argument("--base", required=True, help="alias (smollm2), directory or .gguf of a dense model")
    c.add_argument("--num-experts", type=int, default=8)
    c.add_argument("--topk", type=int, default=2)
    c.add_argument("--adapter-dim", type=int, default=64)
    c.add_argument("--moe-scaling", type=float, default=0.25)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "craft":
            from training.craft import craft

            out = craft(args.base, args.out, args.num_experts, args.topk, args.adapter_dim, args.moe_scaling, args.seed)
            print(f"crafted {args.num_experts} experts (top-{args.topk}, adapter dim {args.adapter_dim}) over {args.base} -> {out}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
