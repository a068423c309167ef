"""Held-out evaluation per domain for several models side by side, plus routing statistics.

By default every model answers through the serving path: a real ``python -m pesc_serve``
with its default flags (``serving="defaults"``; training/served.py), or the same server in
exact float32 (``"exact"``); tool suites send chat requests with ``tools``.  ``"offline"`` is the in-process
greedy loop over the loaded model (``dtype``/``quantization`` apply there only; tool replies
are decoded without the server's grammar and parsed as the server would), which also records routing per domain with
hooks; served runs read the router load from the server's metrics.  Answers are greedy.  Writes ``eval.json`` (scores and
every reply), ``eval_table.md`` (models as rows, suites and domains as columns) and, for
each PESC model, ``routing_<label>.json`` and a ``routing_<label>.png`` heat map.
``heldout="large"`` (``--heldout large``) scores the large held-out set, >= 300 items per
domain, instead of the standard set of the published tables.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pesc_serve.config import LoadConfig
from pesc_serve.models.loader import load_model
from pesc_serve.models.tokenizer import load_tokenizer
from pesc_serve.registry import resolve_model
from training.data import encode_prompt
from training.generate import greedy_generate, stop_ids_for
from training.routing import RoutingRecorder, plot_heatmap, summary
from training.served import SERVING_FLAGS, ServedModel, ServedRouting, describe_profile
from training.tasks import arithmetic, code, general, tools
from training.tasks.items import EvalItem, score

SUITE_ORDER = ("arithmetic", "word_problems", "code_functions", "code_output", "knowledge", "tool_call",
               "tool_no_call", "tool_result")
DOMAINS = ("maths", "code", "general", "tools")
TOOL_SUITES = ("tool_call", "tool_no_call", "tool_result")
HELDOUT_SETS = ("standard", "large")


@dataclass(frozen=True)
class LargeSizes:
    """How many items the large held-out set has per suite (issue #16: >= 300 per domain).

    maths 240 + 84, code 160 + 160, general 52 + len(KNOWLEDGE_LARGE) (417), tools 3 x 108:
    1385 items.  The standard set's 362 (242 without tools) are too few to tell two tuned
    models a few points apart.
    """

    arithmetic_per_op: int = 80
    word_per_op: int = 28
    code_functions: int = 160
    code_outputs: int = 160
    tool_items: int = 108


@dataclass(frozen=True)
class EvalConfig:
    seed: int = 0
    heldout: str = "standard"  # standard (the sizes below; the published tables) | large (LargeSizes)
    serving: str = "defaults"  # defaults | exact (a pesc-serve process) | offline (in-process loop)
    concurrency: int = 16  # served: requests in flight at once (1: the same batches every run)
    dtype: str = "float32"  # offline only: bf16 answers of a 135M model flip with batch composition
    quantization: str = "none"  # offline only: the weights as trained; "auto" = the server's CPU default
    batch_size: int = 16
    # The standard set's sizes (the large set's are LargeSizes).
    arithmetic_per_op: int = 30
    word_per_op: int = 8
    code_functions: int = 36
    code_outputs: int = 40
    tool_items: int = 40  # per tool suite
    limit: int | None = None  # at most this many items per suite (quick checks)
    suites: tuple[str, ...] = SUITE_ORDER


def heldout_items(cfg: EvalConfig) -> list[EvalItem]:
    """The whole held-out set; deterministic in ``cfg.seed``, disjoint from the training mixture."""
    if cfg.heldout not in HELDOUT_SETS:
        raise ValueError(f"unknown held-out set {cfg.heldout!r}; choose from {', '.join(HELDOUT_SETS)}")
    items = _standard_items(cfg) if cfg.heldout == "standard" else _large_items(cfg.seed, LargeSizes())
    unknown = sorted(set(cfg.suites) - set(SUITE_ORDER))
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITE_ORDER)}")
    items = [it for it in items if it.suite in cfg.suites]
    if cfg.limit is not None:
        kept, seen = [], {}
        for it in items:
            seen[it.suite] = seen.get(it.suite, 0) + 1
            if seen[it.suite] <= cfg.limit:
                kept.append(it)
        items = kept
    return items


def _standard_items(cfg: EvalConfig) -> list[EvalItem]:
    """The set every published table scores (its items and order are pinned by a test)."""
    return (arithmetic.heldout_items(cfg.arithmetic_per_op, cfg.word_per_op, cfg.seed)
            + code.heldout_items(cfg.code_functions, cfg.code_outputs, cfg.seed)
            + general.heldout_items()
            + tools.heldout_items(cfg.tool_items, [q for q, _ in general.KNOWLEDGE], cfg.seed))


def _large_items(seed: int, sizes: LargeSizes) -> list[EvalItem]:
    """Enough items per domain to tell models a few points apart; no item twice in a suite."""
    knowledge = general.large_heldout_items()
    return (arithmetic.large_heldout_items(sizes.arithmetic_per_op, sizes.word_per_op, seed)
            + code.large_heldout_items(sizes.code_functions, sizes.code_outputs, seed)
            + knowledge
            + tools.large_heldout_items(sizes.tool_items, [it.prompt for it in knowledge], seed))


@dataclass
class ModelResult:
    label: str
    model: str
    suites: dict[str, dict] = field(default_factory=dict)
    domains: dict[str, dict] = field(default_factory=dict)
    replies: list[dict] = field(default_factory=list)
    routing: dict | None = None
    seconds: float = 0.0


def evaluate_model(label: str, name: str, items: list[EvalItem], cfg: EvalConfig) -> ModelResult:
    if cfg.serving == "offline":
        return _evaluate_offline(label, name, items, cfg)
    if cfg.serving not in SERVING_FLAGS:
        raise ValueError(f"serving must be offline or one of {', '.join(SERVING_FLAGS)}, got {cfg.serving!r}")
    start = time.time()
    source = resolve_model(name)
    tok = load_tokenizer(source)
    result = ModelResult(label, name)
    with ServedModel(name, cfg.serving, cfg.concurrency) as served:
        recorder = ServedRouting(served, int(source.config.get("topk") or 0)) if source.config.get("num_experts") else None
        for suite in SUITE_ORDER:
            group = [it for it in items if it.suite == suite]
            if not group:
                continue
            if suite in TOOL_SUITES:  # chat requests with tools: the server's tool format and grammar

                def run(group=group) -> list[dict]:
                    return served.chat([it.request() for it in group], group[0].max_new_tokens)
            else:
                prompts = [encode_prompt(tok, [{"role": "user", "content": it.prompt}]) for it in group]

                def run(prompts=prompts, n=group[0].max_new_tokens) -> list[str]:
                    return served.complete(prompts, n)

            replies = recorder.measure(group[0].domain, run) if recorder is not None else run()
            _score_suite(result, suite, group, replies)
    _finish(result, recorder, start)
    return result


def _score_suite(result: ModelResult, suite: str, group: list[EvalItem], replies: list) -> None:
    """``replies``: texts, or for tool suites the reply messages (kept as JSON text)."""
    if suite in TOOL_SUITES:
        correct = [tools.score_tool_reply(it, m) for it, m in zip(group, replies)]
        replies = [json.dumps(m, ensure_ascii=False) for m in replies]
    else:
        correct = [score(it, r) for it, r in zip(group, replies)]
    result.suites[suite] = {"domain": group[0].domain, "correct": sum(correct), "total": len(group),
                            "accuracy": round(100.0 * sum(correct) / len(group), 1)}
    result.replies += [{"suite": suite, "prompt": it.prompt, "expected": it.answer, "reply": r, "correct": c}
                       for it, r, c in zip(group, replies, correct)]


def _finish(result: ModelResult, recorder, start: float) -> None:
    for domain in DOMAINS:
        s = [v for v in result.suites.values() if v["domain"] == domain]
        if s:
            c, t = sum(v["correct"] for v in s), sum(v["total"] for v in s)
            result.domains[domain] = {"correct": c, "total": t, "accuracy": round(100.0 * c / t, 1)}
    if recorder is not None and recorder.counts:
        result.routing = summary(recorder)
    result.seconds = round(time.time() - start, 1)


def _evaluate_offline(label: str, name: str, items: list[EvalItem], cfg: EvalConfig) -> ModelResult:
    start = time.time()
    source = resolve_model(name)
    load = LoadConfig(model=name, dtype=cfg.dtype, device="cpu", quantization=cfg.quantization)
    lm = load_model(source, load, max_positions=1024)
    tok = load_tokenizer(source)
    stop = stop_ids_for(tok, lm.config.eos_token_ids)
    recorder = RoutingRecorder(lm.model) if lm.delta is not None and lm.delta.experts else None
    result = ModelResult(label, name)
    for suite in SUITE_ORDER:
        group = [it for it in items if it.suite == suite]
        if not group:
            continue
        if suite in TOOL_SUITES:
            prompts = [encode_prompt(tok, tools.rendered_request(it)) for it in group]
        else:
            prompts = [encode_prompt(tok, [{"role": "user", "content": it.prompt}]) for it in group]
        if recorder is not None:
            with recorder.domain(group[0].domain):
                outs = greedy_generate(lm.model, prompts, group[0].max_new_tokens, stop, cfg.batch_size)
        else:
            outs = greedy_generate(lm.model, prompts, group[0].max_new_tokens, stop, cfg.batch_size)
        texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
        if suite in TOOL_SUITES:  # unconstrained offline: the server's parser reads the text
            texts = [tools.reply_message(it, t) for it, t in zip(group, texts)]
        _score_suite(result, suite, group, texts)
    _finish(result, recorder, start)
    if recorder is not None:
        recorder.close()
    return result


def markdown_table(results: list[ModelResult]) -> str:
    suites = [s for s in SUITE_ORDER if any(s in r.suites for r in results)]
    domains = [d for d in DOMAINS if any(d in r.domains for r in results)]
    head = ["model"] + [f"{results[0].suites[s]['domain']}: {s.replace('_', ' ')}" for s in suites] + [f"**{d}**" for d in domains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [f"{r.label} (`{r.model}`)" if r.label != r.model else f"`{r.model}`"]
        cells += [f"{r.suites[s]['accuracy']:.1f} ({r.suites[s]['correct']}/{r.suites[s]['total']})" for s in suites]
        cells += [f"**{r.domains[d]['accuracy']:.1f}**" for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def routing_path(out_dir: Path, label: str) -> Path:
    """Where a run writes the routing statistics of the model labelled ``label``."""
    return out_dir / f"routing_{_safe(label)}.json"


def run_eval(models: list[tuple[str, str]], out_dir: Path, cfg: EvalConfig, log=print) -> list[ModelResult]:
    """Evaluate ``(label, model)`` pairs in order and write the reports to ``out_dir``."""
    torch.manual_seed(cfg.seed)
    items = heldout_items(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for label, name in models:
        log(f"evaluating {label} ({name}) on {len(items)} held-out items ...")
        r = evaluate_model(label, name, items, cfg)
        log(f"  {label}: " + ", ".join(f"{d} {v['accuracy']:.1f}" for d, v in r.domains.items()) + f" ({r.seconds:.0f} s)")
        if r.routing is not None:
            routing_path(out_dir, label).write_text(json.dumps(r.routing, indent=1) + "\n")
            plot_heatmap(r.routing, f"{label}: share of tokens per expert (top-{_topk(name)})",
                         routing_path(out_dir, label).with_suffix(".png"))
            log(f"  routing: min expert share in middle layers {100 * r.routing['min_share_middle_layers']:.1f}%")
        results.append(r)
    report = {
        "config": {**cfg.__dict__, "suites": list(cfg.suites),
                   "served_as": None if cfg.serving == "offline" else describe_profile(cfg.serving)},
        "items": {s: sum(1 for it in items if it.suite == s) for s in SUITE_ORDER},
        "models": [{"label": r.label, "model": r.model, "suites": r.suites, "domains": r.domains,
                    "seconds": r.seconds, "routing_min_share_middle_layers":
                        None if r.routing is None else r.routing["min_share_middle_layers"]} for r in results],
        "replies": {r.label: r.replies for r in results},
    }
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out_dir / "eval_table.md").write_text(markdown_table(results))
    return results


def _topk(name: str) -> int:
    return int(resolve_model(name).config.get("topk") or 0)
