"""``python -m training craft|data|train|average|eval|compare``: craft PESC models, build data, tune, average
checkpoints, evaluate, compare arms of seeds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.evaluate import HELDOUT_SETS, SUITE_ORDER
from training.lora import LORA_TARGETS


def _add_craft(sub) -> None:
    c = sub.add_parser("craft", help="upcycle a dense model into a PESC delta checkpoint")
    c.add_argument("--base", required=True, help="alias (smollm2), directory or .gguf of a dense model")
    c.add_argument("--num-experts", type=int, default=8)
    c.add_argument("--topk", type=int, default=2)
    c.add_argument("--adapter-dim", type=int, default=64)
    c.add_argument("--moe-scaling", type=float, default=0.25)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, type=Path)


def _add_data(sub) -> None:
    from training.mixture import MixtureConfig

    d = sub.add_parser("data", help="build the offline instruction mixture (train.jsonl, heldout.jsonl, stats.json)")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--base", default="smollm2", help="model that answers the chat-replay prompts ('' to skip them)")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--replay-from", type=Path, default=None,
                   help="an earlier mixture's train.jsonl (same --seed and --chat): reuse its chat replay")
    defaults = MixtureConfig()
    for name in ("seed", "arithmetic", "word_problems", "code_functions", "code_outputs", "module_facts",
                 "country_codes", "chat", "chat_max_new_tokens", "tool_calls", "tool_no_fit", "tool_results"):
        d.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="QLoRA-style instruction tuning; writes a delta (or --merge: a full model)")
    t.add_argument("--model", required=True, help="PESC model (e.g. a crafted delta dir) or a dense one (dense control)")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--data", required=True, nargs="+", help=".json/.jsonl files: chat messages or the authors' format")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    t.add_argument("--micro-batch-size", type=int, default=8, help="examples per forward pass (gradient accumulation)")
    t.add_argument("--max-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--expert-lr", type=float, default=None,
                   help="learning rate of the routers and adapters (PESC only; default: --lr)")
    t.add_argument("--warmup-ratio", type=float, default=0.03)
    t.add_argument("--decay-ratio", type=float, default=0.0,
                   help="the last fraction of the steps lowers the learning rate linearly to 0 (default 0: constant)")
    t.add_argument("--lora-rank", type=int, default=4)
    t.add_argument("--lora-alpha", type=float, default=8.0)
    t.add_argument("--lora-dropout", type=float, default=0.1)
    t.add_argument("--lora-targets", default=",".join(LORA_TARGETS))
    t.add_argument("--adapter-dropout", type=float, default=0.1)
    t.add_argument("--aux-loss-coef", type=float, default=0.01)
    t.add_argument("--quantization", default="none", help="none | nf4 (bitsandbytes, base held 4-bit)")
    t.add_argument("--dtype", default="bfloat16", help="bfloat16 | float32 (frozen base and activations)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (for --resume)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--init-from", type=Path, default=None,
                   help="another run's checkpoint.pt over the same --model: a second stage starts from its weights")
    t.add_argument("--merge", action="store_true", help="write a full Hugging Face model instead of a delta")
    t.add_argument("--max-examples", type=int, default=None)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--note", default="", help="recorded in the delta's config.json")
    t.add_argument("--no-progress", action="store_true")


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="held-out accuracy per domain, side by side, plus routing statistics")
    e.add_argument("--model", required=True)
    e.add_argument("--baseline", action="append", default=[], help="model(s) to compare against (repeatable)")
    e.add_argument("--labels", default=None, help="comma-separated names for baselines..., model (table order)")
    e.add_argument("--out", type=Path, default=Path("training/results"))
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--heldout", default="standard", choices=HELDOUT_SETS,
                   help="standard: the set of the published tables; large: >= 300 items per domain (issue #16)")
    e.add_argument("--serving", default="defaults", choices=("defaults", "exact", "offline"),
                   help="defaults: through `python -m pesc_serve` with its default flags (what users get); "
                        "exact: the same server in float32, unquantized, PyTorch path; offline: in-process loop")
    e.add_argument("--dtype", default="float32", help="offline only: float32 keeps greedy answers independent of batching")
    e.add_argument("--quantization", default="none", help="offline only: none (weights as trained) or e.g. auto")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--limit", type=int, default=None, help="at most N items per suite (quick look)")
    e.add_argument("--suites", default=None, help="comma-separated subset of: " + ", ".join(SUITE_ORDER))
    e.add_argument("--threads", type=int, default=None)


def _add_compare(sub) -> None:
    k = sub.add_parser("compare", help="two arms of seeds (e.g. PESC vs dense) on one held-out set: "
                                       "mean, spread and a paired bootstrap interval of the difference")
    k.add_argument("reports", nargs="+", type=Path, help="eval.json files of python -m training eval")
    k.add_argument("--arm", action="append", default=[], required=True,
                   help="NAME=label1,label2,... (the eval labels of one arm's seeds); give it twice")
    k.add_argument("--rounds", type=int, default=10000, help="bootstrap rounds")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--out", type=Path, default=Path("training/results/compare"))


def _add_average(sub) -> None:
    a = sub.add_parser("average", help="the weighted mean of deltas of one training trajectory (checkpoint averaging)")
    a.add_argument("deltas", nargs="+", type=Path, help="delta directories (a run and its --init-from continuation)")
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--weights", default=None, help="comma-separated, one per delta (default: equal)")
    a.add_argument("--note", default="", help="recorded in the delta's config.json")


def _run(args) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "craft":
        from training.craft import craft

        out = craft(args.base, args.out, args.num_experts, args.topk, args.adapter_dim, args.moe_scaling, args.seed)
        print(f"crafted {args.num_experts} experts (top-{args.topk}, adapter dim {args.adapter_dim}) over {args.base} -> {out}")
    elif args.command == "data":
        from training.mixture import MixtureConfig, write_mixture

        fields = {k: getattr(args, k) for k in MixtureConfig.__dataclass_fields__}
        if args.replay_from is not None and not args.replay_from.is_file():
            raise ValueError(f"--replay-from {args.replay_from}: no such file")
        args.out.mkdir(parents=True, exist_ok=True)
        stats = write_mixture(args.out, MixtureConfig(**fields), args.base or None, replay_from=args.replay_from)
        print(f"wrote {stats['train_examples']} training examples {stats['train_by_domain']} and "
              f"{sum(stats['heldout_by_suite'].values())} held-out items to {args.out}")
    elif args.command == "train":
        from training.trainer import TrainConfig, train

        cfg = TrainConfig(
            model=args.model, out=args.out, data=tuple(args.data), steps=args.steps, epochs=args.epochs,
            batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, max_len=args.max_len, lr=args.lr,
            expert_lr=args.expert_lr, warmup_ratio=args.warmup_ratio, decay_ratio=args.decay_ratio, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
            adapter_dropout=args.adapter_dropout, aux_loss_coef=args.aux_loss_coef, quantization=args.quantization,
            dtype=args.dtype, seed=args.seed, save_every=args.save_every, resume=args.resume, merge=args.merge,
            init_from=args.init_from,
            max_examples=args.max_examples, note=args.note, progress=not args.no_progress,
        )
        train(cfg)
    elif args.command == "average":
        from training.average import average_deltas

        try:
            weights = [float(w) for w in args.weights.split(",")] if args.weights else None
        except ValueError:
            raise ValueError(f"--weights {args.weights!r}: give comma-separated numbers") from None
        out = average_deltas(args.deltas, args.out, weights, args.note)
        print(f"wrote the mean of {len(args.deltas)} deltas to {out}")
    elif args.command == "eval":
        from training.evaluate import EvalConfig, run_eval

        names = args.baseline + [args.model]
        labels = args.labels.split(",") if args.labels else names
        if len(labels) != len(names):
            raise ValueError(f"--labels names {len(labels)} models but there are {len(names)} (baselines..., model)")
        suites = tuple(args.suites.split(",")) if args.suites else SUITE_ORDER
        cfg = EvalConfig(seed=args.seed, heldout=args.heldout, serving=args.serving, dtype=args.dtype,
                         quantization=args.quantization, batch_size=args.batch_size, limit=args.limit, suites=suites)
        run_eval(list(zip(labels, names)), args.out, cfg)
        print((args.out / "eval_table.md").read_text())
    elif args.command == "compare":
        from training.compare import parse_arm, run_compare

        if len(args.arm) != 2:
            raise ValueError(f"--arm must be given exactly twice (got {len(args.arm)})")
        run_compare(args.reports, parse_arm(args.arm[0]), parse_arm(args.arm[1]), args.out, args.rounds, args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_craft(sub)
    _add_data(sub)
    _add_train(sub)
    _add_average(sub)
    _add_eval(sub)
    _add_compare(sub)
    args = parser.parse_args(argv)
    try:
        _run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
