"""lm-evaluation-harness against a running pesc-serve: its own ``local-completions`` model, on
local multiple-choice tasks built from this project's held-out data.

    python -m benchmarks.run_lm_eval --lm-eval /path/to/venv/bin/lm_eval

Why: lm-evaluation-harness is how people score served models, and its loglikelihood requests
(``echo`` + ``logprobs`` + prompt tokens, batched) exercise the completions endpoint the way no
chat client does.  One pesc-serve process (default flags) serves the base and the bundled deltas;
the harness picks each with ``model=``.  lm-eval pins its own dependencies: install it in a venv
of its own (``python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 transformers 'lm-eval[api]'``).

The tasks (``--include_path``) are written next to the results: ``pesc_capitals`` (held-out
knowledge questions, the right capital among four) and ``pesc_arithmetic`` (held-out arithmetic,
the right result among four near misses).  None of their questions is in the training mixture.
Writes ``benchmarks/results/lm_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
TASKS = ("pesc_capitals", "pesc_arithmetic")

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def capitals_docs(seed: int = 0) -> list[dict]:
    from training.tasks.general import KNOWLEDGE

    rng = random.Random(f"lm-eval-capitals-{seed}")
    capitals = [(q, a.split("|")[0]) for q, a in KNOWLEDGE if q.startswith("What is the capital of")]
    names = [a for _, a in capitals]
    docs = []
    for q, a in capitals:
        choices = rng.sample([n for n in names if n != a], 3) + [a]
        rng.shuffle(choices)
        docs.append({"question": q, "choices": [f" {c}" for c in choices], "answer": choices.index(a)})
    return docs


def arithmetic_docs(seed: int = 0) -> list[dict]:
    from training.evaluate import EvalConfig, heldout_items

    rng = random.Random(f"lm-eval-arith-{seed}")
    docs = []
    for it in heldout_items(EvalConfig(seed=seed, suites=("arithmetic",))):
        right = int(it.answer)
        wrong = set()
        while len(wrong) < 3:
            d = rng.choice([-10, -2, -1, 1, 2, 10, 100])
            if right + d != right:
                wrong.add(right + d)
        choices = list(wrong) + [right]
        rng.shuffle(choices)
        docs.append({"question": it.prompt, "choices": [f" {c}" for c in choices], "answer": choices.index(right)})
    return docs


def write_tasks(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for task, docs in (("pesc_capitals", capitals_docs()), ("pesc_arithmetic", arithmetic_docs())):
        data = directory / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (directory / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data))


def save_tokenizer(model: str, directory: Path) -> Path:
    """The served model's tokenizer as a Hugging Face directory (lm-eval splits context and
    continuation with it; there is no hub to fetch it from)."""
    from pesc_serve.models.tokenizer import load_tokenizer
    from pesc_serve.registry import resolve_model

    load_tokenizer(resolve_model(model)).save_pretrained(str(directory))
    return directory


def serve(base: str, adapters: list[str], port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pesc_serve", "--model", base, "--port", str(port), "--log-level", "warning"]
    if adapters:
        cmd += ["--adapters", *adapters]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pesc-serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("pesc-serve did not become healthy")


def run_harness(lm_eval: str, model: str, port: int, tokenizer: Path, tasks_dir: Path, out: Path) -> dict:
    args = ",".join([f"model={model}", f"base_url=http://127.0.0.1:{port}/v1/completions", f"tokenizer={tokenizer}",
                     "tokenizer_backend=huggingface", "tokenized_requests=True", "num_concurrent=1", "max_retries=1"])
    cmd = [lm_eval, "--model", "local-completions", "--model_args", args, "--include_path", str(tasks_dir),
           "--tasks", ",".join(TASKS), "--batch_size", "8", "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, env=env)
    found = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"lm_eval wrote no results under {out}")
    results = json.loads(found[-1].read_text())["results"]
    return {t: {"acc": results[t]["acc,none"], "stderr": results[t].get("acc_stderr,none")} for t in TASKS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-eval", default="lm_eval", help="the lm_eval command (its own venv)")
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--adapters", nargs="*", default=["camelidae=camelidae", "camel=camel"])
    ap.add_argument("--port", type=int, default=8310)
    args = ap.parse_args(argv)
    from benchmarks.host_info import host_cpu

    work = Path(tempfile.mkdtemp(prefix="pesc-lm-eval-"))
    write_tasks(work / "tasks")
    tokenizer = save_tokenizer(args.base, work / "tokenizer")
    models = [args.base] + [a.partition("=")[0] for a in args.adapters]
    proc = serve(args.base, args.adapters, args.port)
    scores = {}
    try:
        for model in models:
            scores[model] = run_harness(args.lm_eval, model, args.port, tokenizer, work / "tasks", work / f"out-{model}")
    finally:
        proc.terminate()
        proc.wait(60)
    report = {"host": host_cpu(), "command": "python -m benchmarks.run_lm_eval", "served_as":
              f"python -m pesc_serve --model {args.base} --adapters {' '.join(args.adapters)} (default flags)",
              "items": {t: len((work / "tasks" / f"{t}.jsonl").read_text().splitlines()) for t in TASKS},
              "scores": scores}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| model | " + " | ".join(TASKS) + " |")
    print("|---|" + "---|" * len(TASKS))
    for model, s in scores.items():
        print(f"| {model} | " + " | ".join(f"{100 * s[t]['acc']:.1f}" for t in TASKS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
