"""Held-out evaluation items and how a model's reply is scored against each."""

from __future__ import annotations

import re
from dataclasses import dataclass

from training.tasks.sandbox import run_python

CHECKS = ("number", "contains", "python", "output", "tool")
_INT = re.compile(r"-?\d[\d,]*")
_CODE_BLOCK = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.DOTALL)
_INLINE = re.compile(r"`([^`\n]+)`")


@dataclass(frozen=True)
class EvalItem:
    """One question with its expected answer; ``check`` says how a reply is judged.

    number: the last integer in the reply equals ``answer``; contains: one of the
    ``|``-separated ``answer`` alternatives occurs as a word; python: the reply's code plus
    the test code in ``answer`` runs cleanly in the sandbox; output: the reply states the
    exact printed output ``answer`` (in backticks, a code block, or as the whole reply); tool:
    a chat request with tools, scored on the reply message (training.tasks.tools).
    """

    suite: str
    domain: str
    prompt: str
    answer: str
    check: str
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}")

    def to_json(self) -> dict:
        return {"suite": self.suite, "domain": self.domain, "prompt": self.prompt, "answer": self.answer,
                "check": self.check, "max_new_tokens": self.max_new_tokens}


def last_integer(text: str) -> int | None:
    found = _INT.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", "").rstrip(","))
    except ValueError:
        return None


def extract_code(reply: str) -> str:
    """The first fenced code block, else the whole reply."""
    m = _CODE_BLOCK.search(reply)
    return m.group(1) if m else reply


def _output_candidates(reply: str) -> list[str]:
    out = [m.group(1) for m in _CODE_BLOCK.finditer(reply)] + _INLINE.findall(reply)
    lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
    out += [reply] + (lines[-1:] if lines else [])
    return [c.strip() for c in out]


def score(item: EvalItem, reply: str) -> bool:
    if item.check == "tool":
        raise ValueError("tool items are scored on the reply message: training.tasks.tools.score_tool_reply")
    if item.check == "number":
        return last_integer(reply) == int(item.answer)
    if item.check == "contains":
        return any(re.search(rf"(?<!\w){re.escape(alt)}(?!\w)", reply, re.IGNORECASE) for alt in item.answer.split("|"))
    if item.check == "python":
        return run_python(extract_code(reply) + "\n\n" + item.answer, timeout_s=5.0).ok
    return item.answer.strip() in _output_candidates(reply)
