"""Instruction data: file formats, chat-template encoding with answer-only labels, batching.

Accepted files (``.json`` = one JSON array, ``.jsonl`` = one record per line), records of:

* chat messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  (as SlimOrca/Magicoder/MetaMathQA exports in the common chat format);
* the PESC authors' format: ``{"instruction": str, "conversation": [{"input": str, "output": str}, ...]}``
  where ``instruction`` is the system prompt (may be empty).

An optional ``"domain"`` string on a record tags it for mixture statistics.  Every example is
rendered with the base tokenizer's chat template; only assistant answers (up to and including
the end-of-turn token) are labelled, everything else is ``IGNORE_INDEX``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.losses import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One conversation; the assistant turns are what the model learns to produce."""

    messages: tuple[dict[str, str], ...]
    domain: str = "general"

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "messages": [dict(m) for m in self.messages]}


@dataclass
class Encoded:
    """Token ids and labels (IGNORE_INDEX outside answers) of one example."""

    input_ids: list[int]
    labels: list[int]
    domain: str = "general"

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class Batch:
    """A right-padded micro-batch."""

    input_ids: torch.Tensor  # [B, S] long
    labels: torch.Tensor  # [B, S] long
    attention_mask: torch.Tensor  # [B, S] bool (True = real token)

    @property
    def num_answer_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


# --- reading files ---------------------------------------------------------------------------


def _parse_record(rec: Any, where: str, default_domain: str) -> Example:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    domain = rec.get("domain", default_domain)
    if not isinstance(domain, str):
        raise ValueError(f"{where}: 'domain' must be a string")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': str}}")
            out.append({"role": m["role"], "content": m["content"]})
    elif "conversation" in rec:
        conv = rec["conversation"]
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"{where}: 'conversation' must be a non-empty list of {{'input', 'output'}}")
        system = rec.get("instruction") or rec.get("system") or ""
        if not isinstance(system, str):
            raise ValueError(f"{where}: 'instruction' must be a string")
        out = [{"role": "system", "content": system}] if system.strip() else []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or not isinstance(turn.get("input"), str) or not isinstance(turn.get("output"), str):
                raise ValueError(f"{where}: conversation[{i}] must be {{'input': str, 'output': str}}")
            out += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
    else:
        raise ValueError(
            f"{where}: unknown record format (keys {sorted(rec)[:6]}); expected 'messages' (chat format) "
            f"or 'conversation' + 'instruction' (PESC authors' format)"
        )
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise ValueError(f"{where}: no non-empty assistant answer to learn from")
    return Example(tuple(out), domain)


def load_data_file(path: Path, default_domain: str | None = None) -> list[Example]:
    """Read one ``.json``/``.jsonl`` file; every problem raises ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    domain = default_domain or path.stem
    text = path.read_text(encoding="utf-8")
    records: list[tuple[str, Any]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        records = [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    else:
        raise ValueError(f"{path}: data files must end in .json (an array) or .jsonl (one record per line)")
    if not records:
        raise ValueError(f"{path}: no records")
    return [_parse_record(rec, where, domain) for where, rec in records]


def write_jsonl(path: Path, examples: Iterable[Example]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


# --- encoding --------------------------------------------------------------------------------


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ready for the assistant's reply (what generation feeds)."""
    return tokenizer(render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]


def answer_char_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant answer.

    A span starts after the template's assistant header and ends after the end-of-turn
    token (EOS), so the model learns to stop; the template's trailing newline is excluded.
    """
    full = render(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[: i + 1])
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        if not full.startswith(before) or not full.startswith(upto):
            raise ValueError("the chat template does not render conversations prefix-stably; cannot find answers")
        start = upto.find(m["content"], len(before))
        if start < 0:
            raise ValueError("the chat template changes assistant answers; cannot find them in the rendered text")
        end = start + len(m["content"])
        if eos and upto.startswith(eos, end):
            end += len(eos)
        elif eos and eos in upto[end:]:
            end = upto.index(eos, end) + len(eos)
        spans.append((start, end))
    return full, spans


def encode(tokenizer, example: Example, max_len: int) -> Encoded | None:
    """Ids + answer-only labels; truncated to ``max_len``; None when no answer token survives."""
    text, spans = answer_char_spans(tokenizer, list(example.messages))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (a, b) in enumerate(offsets):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[j] = ids[j]
    ids, labels = ids[:max_len], labels[:max_len]
    if all(t == IGNORE_INDEX for t in labels[1:]):
        return None
    return Encoded(ids, labels, example.domain)


def encode_all(tokenizer, examples: list[Example], max_len: int) -> tuple[list[Encoded], int]:
    """Encode every example; returns the kept ones and how many were dropped."""
    out = [e for e in (encode(tokenizer, ex, max_len) for ex in examples) if e is not None]
    return out, len(examples) - len(out)


# --- batching --------------------------------------------------------------------------------


def collate(items: list[Encoded], pad_id: int) -> Batch:
    s = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), s), pad_id, dtype=torch.long)
    labels = torch.full((len(items), s), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(items), s, dtype=torch.bool)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = True
    return Batch(ids, labels, mask)


def step_batches(items: list[Encoded], batch_size: int, micro_batch_size: int, seed: int, epoch: int,
                 group_steps: int = 16) -> list[list[list[Encoded]]]:
    """One epoch as optimizer steps, each a list of micro-batches (lists of examples).

    Shuffled with (seed, epoch), then grouped by length like Hugging Face's
    ``group_by_length``: each window of ``group_steps`` steps is sorted by length and cut into
    steps, and the steps are shuffled again.  Similar lengths share a micro-batch, so little
    compute goes to padding.  A last partial step is dropped.
    """
    rng = random.Random(seed * 1000003 + epoch)
    order = list(range(len(items)))
    rng.shuffle(order)
    usable = len(order) - len(order) % batch_size
    window = batch_size * group_steps
    steps = []
    for start in range(0, usable, window):
        chunk = sorted(order[start : min(start + window, usable)], key=lambda i: len(items[i].input_ids))
        for s in range(0, len(chunk), batch_size):
            step = [items[i] for i in chunk[s : s + batch_size]]
            steps.append([step[j : j + micro_batch_size] for j in range(0, batch_size, micro_batch_size)])
    rng.shuffle(steps)
    return steps


def iter_steps(items: list[Encoded], batch_size: int, micro_batch_size: int, seed: int) -> Iterator[list[list[Encoded]]]:
    """Optimizer steps over as many epochs as needed (each epoch reshuffled)."""
    if len(items) < batch_size:
        raise ValueError(f"only {len(items)} usable training examples, fewer than --batch-size {batch_size}")
    epoch = 0
    while True:
        yield from step_batches(items, batch_size, micro_batch_size, seed, epoch)
        epoch += 1
