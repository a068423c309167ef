"""Maths domain: two-digit +, -, x questions and one-step word problems, answers computed.

Held-out evaluation differs from training twice over: its questions use templates that
never occur in training (different wording), and its operand pairs come from a reserved
fifth of all (op, a, b) triples that training never samples (:func:`is_heldout`).

Answers are short worked steps a 135M model can learn, ending with the result (the last
number of the reply is what is scored): sums and differences tens first, then units
(``74 - 37 = 74 - 30 - 7 = 44 - 7 = 37.``); products as one-digit partial products with
their zeros, then running sums.  (Direct answers, tried first, left subtraction at ~20%.)
"""

from __future__ import annotations

import random
import zlib

from training.data import Example
from training.tasks.items import EvalItem

OPS = ("+", "-", "*")
_WORD = {"+": "plus", "-": "minus", "*": "times"}

TRAIN_TEMPLATES = {
    "+": ["What is {a} + {b}?", "Calculate {a} + {b}.", "{a} + {b} = ?", "Find the sum of {a} and {b}.",
          "Add {a} and {b}.", "Evaluate {a} + {b}.", "What is the sum of {a} and {b}? Give only the result.",
          "Work out {a} plus {b}.", "Solve: {a} + {b}", "What is {a} plus {b}?", "What is {b} more than {a}?",
          "Increase {a} by {b}.", "What do {a} and {b} add up to?", "Sum up {a} and {b}."],
    "-": ["What is {a} - {b}?", "Calculate {a} - {b}.", "{a} - {b} = ?", "Find the difference between {a} and {b}.",
          "Subtract {b} from {a}.", "Evaluate {a} - {b}.", "What is {a} minus {b}? Give only the result.",
          "Work out {a} minus {b}.", "Solve: {a} - {b}", "What is {a} minus {b}?", "What is {b} less than {a}?",
          "Decrease {a} by {b}.", "If you remove {b} from {a}, what is left?", "What is the gap between {a} and {b}?"],
    "*": ["What is {a} * {b}?", "Calculate {a} × {b}.", "{a} * {b} = ?", "Find the product of {a} and {b}.",
          "Multiply {a} by {b}.", "Evaluate {a} × {b}.", "Work out {a} times {b}.", "Solve: {a} * {b}",
          "What is {a} times {b}?", "What is the product of {a} and {b}?", "What is {a} lots of {b}?",
          "Scale {a} by a factor of {b}.", "What do {a} rows of {b} give in total?", "Give the product {a} × {b}."],
}
# Wording that never appears in TRAIN_TEMPLATES (the DESIGN.md probe phrasing is the first).
HELDOUT_TEMPLATES = {
    "+": ["Compute {a} plus {b}. Reply with just the number.", "How much is {a} added to {b}?",
          "Tell me the total when {a} and {b} are combined.", "I need the value of {a} + {b}, please."],
    "-": ["Compute {a} minus {b}. Reply with just the number.", "How much is {a} take away {b}?",
          "Tell me what remains when {b} is taken from {a}.", "By how much does {a} exceed {b}?"],
    "*": ["Compute {a} times {b}. Reply with just the number.", "How much is {a} multiplied by {b}?",
          "Tell me the result of multiplying {a} with {b}.", "I need the value of {a} × {b}, please."],
}

NAMES = ["Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Emma", "Kenji", "Sara"]
OBJECTS = ["apples", "marbles", "stickers", "pencils", "coins", "cards", "stamps", "shells", "books", "toy cars"]
TRAIN_WORD = {
    "+": ("{n} has {a} {o}. {n} gets {b} more {o}. How many {o} does {n} have now?",
          "{steps} {n} has {c} {o} now. The answer is {c}."),
    "-": ("{n} had {a} {o} and gave {b} of them to a friend. How many {o} does {n} have left?",
          "{steps} {n} has {c} {o} left. The answer is {c}."),
    "*": ("{n} has {a} bags with {b} {o} in each bag. How many {o} does {n} have in total?", None),
}
HELDOUT_WORD = {
    "+": "A library received {a} new books on Monday and {b} more on Tuesday. How many books arrived over the two days?",
    "-": "A baker made {a} muffins and sold {b} of them. How many muffins were not sold?",
    "*": "A theater has {a} rows with {b} seats in every row. How many seats does the theater have?",
}


def is_heldout(op: str, a: int, b: int) -> bool:
    """One (op, a, b) triple in five is reserved for evaluation (stable across runs)."""
    return zlib.crc32(f"{op}:{a}:{b}".encode()) % 5 == 0


def compute(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def multiplication_steps(a: int, b: int) -> str:
    """``35 * 27``: one-digit partial products (with their zeros), then running sums."""
    parts = [(x, y) for x in (a - a % 10, a % 10) for y in (b - b % 10, b % 10) if x and y]
    products = [x * y for x, y in parts]
    lines = ", ".join(f"{x} * {y} = {x * y}" for x, y in parts)
    sums, total = [], products[0]
    for p in products[1:]:
        sums.append(f"{total} + {p} = {total + p}")
        total += p
    text = f"{a} * {b}: {lines}."
    if sums:
        text += " " + ", ".join(sums) + "."
    return text + f" So {a} * {b} = {a * b}."


def sum_steps(op: str, a: int, b: int) -> str:
    """``74 - 37 = 74 - 30 - 7 = 44 - 7 = 37.``: tens first, then units (each step is small)."""
    tens, units = b - b % 10, b % 10
    first = a + tens if op == "+" else a - tens
    if not units:
        return f"{a} {op} {b} = {first}."
    return f"{a} {op} {b} = {a} {op} {tens} {op} {units} = {first} {op} {units} = {compute(op, a, b)}."


def answer_text(op: str, a: int, b: int) -> str:
    return multiplication_steps(a, b) if op == "*" else sum_steps(op, a, b)


def _operands(rng: random.Random, op: str, heldout: bool) -> tuple[int, int]:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and a < b:
            a, b = b, a
        if is_heldout(op, a, b) == heldout:
            return a, b


def train_examples(n_arith: int, n_word: int, seed: int) -> list[Example]:
    rng = random.Random(f"arith-train-{seed}")
    out = []
    for i in range(n_arith):
        op = OPS[i % 3]
        a, b = _operands(rng, op, heldout=False)
        q = rng.choice(TRAIN_TEMPLATES[op]).format(a=a, b=b)
        out.append(_example(q, answer_text(op, a, b)))
    for i in range(n_word):
        op = OPS[i % 3]
        a, b = _operands(rng, op, heldout=False)
        n, o = rng.choice(NAMES), rng.choice(OBJECTS)
        question, answer = TRAIN_WORD[op]
        c = compute(op, a, b)
        if answer is None:
            reply = multiplication_steps(a, b) + f" {n} has {c} {o} in total. The answer is {c}."
        else:
            reply = answer.format(n=n, o=o, c=c, steps=sum_steps(op, a, b))
        out.append(_example(question.format(n=n, o=o, a=a, b=b), reply))
    return out


def _example(question: str, answer: str) -> Example:
    return Example(({"role": "user", "content": question}, {"role": "assistant", "content": answer}), "maths")


def heldout_items(n_per_op: int, n_word_per_op: int, seed: int) -> list[EvalItem]:
    rng = random.Random(f"arith-heldout-{seed}")
    items = []
    for op in OPS:
        for i in range(n_per_op):
            a, b = _operands(rng, op, heldout=True)
            q = HELDOUT_TEMPLATES[op][i % len(HELDOUT_TEMPLATES[op])].format(a=a, b=b)
            items.append(EvalItem("arithmetic", "maths", q, str(compute(op, a, b)), "number", 160))
    for op in OPS:
        for _ in range(n_word_per_op):
            a, b = _operands(rng, op, heldout=True)
            items.append(EvalItem("word_problems", "maths", HELDOUT_WORD[op].format(a=a, b=b),
                                  str(compute(op, a, b)), "number", 192))
    return items


def _distinct_operands(rng: random.Random, op: str, n: int) -> list[tuple[int, int]]:
    """``n`` different held-out operand pairs for ``op``: a larger set must not count an item twice."""
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        pair = _operands(rng, op, heldout=True)
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def large_heldout_items(n_per_op: int, n_word_per_op: int, seed: int) -> list[EvalItem]:
    """The large held-out set's maths: the same held-out wording and reserved operand triples as
    :func:`heldout_items`, its own random stream, and no operand pair twice per operation and suite."""
    rng = random.Random(f"arith-heldout-large-{seed}")
    items = []
    for op in OPS:
        templates = HELDOUT_TEMPLATES[op]
        for i, (a, b) in enumerate(_distinct_operands(rng, op, n_per_op)):
            q = templates[i % len(templates)].format(a=a, b=b)
            items.append(EvalItem("arithmetic", "maths", q, str(compute(op, a, b)), "number", 160))
    for op in OPS:
        for a, b in _distinct_operands(rng, op, n_word_per_op):
            items.append(EvalItem("word_problems", "maths", HELDOUT_WORD[op].format(a=a, b=b),
                                  str(compute(op, a, b)), "number", 192))
    return items
