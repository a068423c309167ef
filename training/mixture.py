"""The offline instruction mixture (maths, code, general, tools) and its held-out split.

No hub access here, so the three domains of the paper's data (SlimOrca chat, Magicoder code,
MetaMathQA maths) are rebuilt at toy scale from material that needs no network: generated
arithmetic with computed answers, Python tasks whose answers were checked by running them,
facts from text shipped with installed packages, and chat answers of the base model itself.
The held-out items (:func:`training.evaluate.heldout_items`) never enter training:
:func:`check_disjoint` verifies no held-out question occurs in the training file.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from training.data import Example, encode_prompt, load_data_file, write_jsonl
from training.evaluate import HELDOUT_SETS, EvalConfig, heldout_items
from training.tasks import arithmetic, code, general, tools


@dataclass(frozen=True)
class MixtureConfig:
    """How many training examples of each kind (the seed also fixes every choice)."""

    seed: int = 0
    arithmetic: int = 1500
    word_problems: int = 300
    code_functions: int = 450
    code_outputs: int = 450
    module_facts: int = 150
    country_codes: int = 150
    chat: int = 1551
    chat_max_new_tokens: int = 96
    tool_calls: int = 800
    tool_no_fit: int = 300
    tool_results: int = 300

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if isinstance(v, int) and v < 0:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {v}")


def distill_chat(base: str, prompts: list[str], max_new_tokens: int, log: Callable[[str], None]) -> list[Example]:
    """The base model's own greedy answers to everyday prompts (kept only when complete)."""
    from pesc_serve.config import LoadConfig
    from pesc_serve.models.loader import load_model
    from pesc_serve.models.tokenizer import load_tokenizer
    from pesc_serve.registry import resolve_model
    from training.generate import greedy_generate, stop_ids_for

    source = resolve_model(base)
    load = LoadConfig(model=base, dtype="bfloat16", device="cpu", quantization="none")
    lm = load_model(source, load, max_positions=1024)
    tok = load_tokenizer(source)
    log(f"answering {len(prompts)} chat prompts with {base} (self-distilled replay) ...")
    ids = [encode_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    outs = greedy_generate(lm.model, ids, max_new_tokens, stop_ids_for(tok, lm.config.eos_token_ids), batch_size=32)
    examples = []
    for prompt, out in zip(prompts, outs):
        reply = tok.decode(out, skip_special_tokens=True).strip()
        if reply and len(out) < max_new_tokens:
            examples.append(Example(({"role": "user", "content": prompt}, {"role": "assistant", "content": reply}), "general"))
    return examples


def reused_chat(path: Path, prompts: list[str]) -> list[Example]:
    """The chat replay of an earlier mixture (its ``train.jsonl``), in ``prompts`` order: the
    base's answers do not change while the base does not, and answering 1,551 prompts again costs
    ~12 minutes of two cores.  Only examples asking one of ``prompts`` are taken, so the rest of
    that file (its maths, code and tools) stays out."""
    wanted = set(prompts)
    found = {ex.messages[0]["content"]: ex for ex in load_data_file(path)
             if len(ex.messages) == 2 and ex.messages[0]["role"] == "user" and ex.messages[0]["content"] in wanted}
    if not found:
        raise ValueError(f"--replay-from {path}: none of its examples is a chat-replay prompt of this mixture "
                         f"(was it built with --chat 0 or another --seed?)")
    return [found[p] for p in prompts if p in found]


def no_fit_pairs(cfg: MixtureConfig, chat_replay: list[Example]) -> list[tuple[str, str]]:
    """(question, answer) pairs answered in text beside unrelated tools: two thirds everyday and
    factual chat (the base's own replies) where there is chat replay, the rest arithmetic and ISO
    codes.  With arithmetic and ISO codes alone, a tuned camelidae called a tool for every
    held-out question that no tool fitted (training/results/tools/): they are too easy to tell
    apart from tool requests."""
    n = cfg.tool_no_fit
    chat = [(ex.messages[0]["content"], ex.messages[-1]["content"]) for ex in chat_replay][: n - n // 3]
    rest = n - len(chat)
    other = [(ex.messages[0]["content"], ex.messages[-1]["content"])
             for ex in arithmetic.train_examples(rest // 2, 0, cfg.seed + 1)
             + general.fact_examples(rest - rest // 2, 0, cfg.seed + 1)]
    return (chat + other) or [("Hi", "Hello!")]


def build_mixture(cfg: MixtureConfig, base: str | None, log: Callable[[str], None] = print,
                  replay_from: Path | None = None) -> tuple[list[Example], dict]:
    """Training examples (shuffled) and a per-source count; ``replay_from``: take the chat replay
    from that earlier ``train.jsonl`` (:func:`reused_chat`) instead of asking ``base``."""
    eval_cfg = EvalConfig(seed=cfg.seed)
    parts = {
        "arithmetic+word_problems": arithmetic.train_examples(cfg.arithmetic, cfg.word_problems, cfg.seed),
        "code_functions+code_output": code.train_examples(cfg.code_functions, cfg.code_outputs, cfg.seed,
                                                          eval_cfg.code_outputs),
        "iso3166+stdlib_facts": general.fact_examples(cfg.country_codes, cfg.module_facts, cfg.seed),
    }
    if cfg.chat and replay_from is not None:
        parts["chat_replay"] = reused_chat(replay_from, general.chat_prompts(cfg.chat, cfg.seed))
    elif cfg.chat and base:
        parts["chat_replay"] = distill_chat(base, general.chat_prompts(cfg.chat, cfg.seed), cfg.chat_max_new_tokens, log)
    parts["tool_use"] = tools.train_examples(cfg.tool_calls, cfg.tool_no_fit, cfg.tool_results,
                                             no_fit_pairs(cfg, parts.get("chat_replay", [])), cfg.seed)
    examples = [ex for part in parts.values() for ex in part]
    random.Random(f"mixture-{cfg.seed}").shuffle(examples)
    counts = {name: len(part) for name, part in parts.items()}
    return examples, counts


def check_disjoint(examples: list[Example], eval_cfg: EvalConfig) -> int:
    """Number of held-out questions that occur verbatim as a training question (must be 0)."""
    train_questions = {m["content"] for ex in examples for m in ex.messages if m["role"] == "user"}
    # A held-out tool item's question also counts when a training example asked it beside tools.
    return sum(1 for it in heldout_items(eval_cfg) if it.prompt in train_questions)


def check_disjoint_all(examples: list[Example], seed: int) -> int:
    """:func:`check_disjoint` summed over every held-out set (standard and large)."""
    return sum(check_disjoint(examples, EvalConfig(seed=seed, heldout=h)) for h in HELDOUT_SETS)


def write_mixture(out_dir: Path, cfg: MixtureConfig, base: str | None, log: Callable[[str], None] = print,
                  replay_from: Path | None = None) -> dict:
    """``train.jsonl`` (chat format with ``domain``), ``heldout.jsonl`` (the standard set),
    ``heldout_large.jsonl`` and ``stats.json``; no held-out question may occur in training."""
    examples, counts = build_mixture(cfg, base, log, replay_from)
    eval_cfg = EvalConfig(seed=cfg.seed)
    overlap = check_disjoint_all(examples, cfg.seed)
    if overlap:
        raise RuntimeError(f"{overlap} held-out questions leaked into the training mixture")
    write_jsonl(out_dir / "train.jsonl", examples)
    items = heldout_items(eval_cfg)
    large = heldout_items(EvalConfig(seed=cfg.seed, heldout="large"))
    _write_items(out_dir / "heldout.jsonl", items)
    _write_items(out_dir / "heldout_large.jsonl", large)
    stats = {
        "config": asdict(cfg),
        "base_for_chat_replay": base,
        "chat_replay_from": str(replay_from) if replay_from is not None else None,
        "train_examples": len(examples),
        "train_by_source": counts,
        "train_by_domain": dict(Counter(ex.domain for ex in examples)),
        "train_characters": sum(len(m["content"]) for ex in examples for m in ex.messages),
        "heldout_by_suite": dict(Counter(it.suite for it in items)),
        "heldout_large_by_suite": dict(Counter(it.suite for it in large)),
        "heldout_questions_in_train": overlap,
    }
    if base:
        stats["train_tokens"] = _count_tokens(base, examples)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _write_items(path: Path, items: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(it.to_json(), ensure_ascii=False) + "\n" for it in items)


def _count_tokens(base: str, examples: list[Example]) -> dict:
    from pesc_serve.models.tokenizer import load_tokenizer
    from pesc_serve.registry import resolve_model
    from training.data import encode

    tok = load_tokenizer(resolve_model(base))
    total, answer = 0, 0
    for ex in examples:
        enc = encode(tok, ex, 1 << 30)
        if enc is not None:
            total += len(enc.input_ids)
            answer += enc.num_answer_tokens
    return {"total": total, "answer": answer}
