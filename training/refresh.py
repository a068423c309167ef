"""``python -m training.refresh``: a short second-stage mixture that teaches when *not* to call.

Why: the first tuning of camelidae on the tool domain learned "tools offered -> call" (held-out
questions beside unrelated tools were answered with a call every time): its no-fit examples
were arithmetic and ISO-code questions, easy to tell apart from the tool requests.  This stage
answers everyday and factual questions (the base's own self-distilled chat replies, already in
the mixture) as ``{"response": ...}`` beside unrelated tools, next to fresh calls, tool-result
turns and a replay of the other domains so they are not forgotten.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

from training.data import load_data_file, write_jsonl
from training.mixture import check_disjoint_all
from training.tasks import tools


def build(train: Path, no_fit: int, calls: int, results: int, replay: int, seed: int) -> list:
    examples = load_data_file(train)
    chat = [ex for ex in examples if ex.domain == "general" and len(ex.messages) == 2
            and "ISO 3166" not in ex.messages[1]["content"]]
    rng = random.Random(f"refresh-{seed}")
    pairs = [(ex.messages[0]["content"], ex.messages[1]["content"]) for ex in rng.sample(chat, min(no_fit, len(chat)))]
    fresh = tools.train_examples(calls, len(pairs), results, pairs, seed + 100)
    others = [ex for ex in examples if ex.domain != "tools"]
    mix = fresh + rng.sample(others, min(replay, len(others)))
    rng.shuffle(mix)
    return mix


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.refresh", description=__doc__)
    ap.add_argument("--data", type=Path, required=True, help="the first stage's train.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-fit", type=int, default=200)
    ap.add_argument("--calls", type=int, default=150)
    ap.add_argument("--results", type=int, default=50)
    ap.add_argument("--replay", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    mix = build(args.data, args.no_fit, args.calls, args.results, args.replay, args.seed)
    if check_disjoint_all(mix, args.seed):
        raise SystemExit("held-out questions leaked into the refresh mixture")
    write_jsonl(args.out, mix)
    print(f"wrote {len(mix)} examples {dict(Counter(ex.domain for ex in mix))} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
