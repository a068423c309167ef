"""Code domain: small Python functions checked by tests, and "what does this print" questions.

Every training solution is run against its tests (and every snippet executed to get its
output) before it is used, so no answer is wrong.  Held-out items use other phrasings,
other function names and parameters, and three function families training never shows.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from training.data import Example
from training.tasks.items import EvalItem
from training.tasks.sandbox import run_many


@dataclass(frozen=True)
class FunctionTask:
    """A described function, a reference solution and assert-based tests."""

    name: str
    description: str
    solution: str
    tests: str


# Each family: (k, name) -> (description, body, tests); ``f`` stands for the function name.
Family = Callable[[random.Random, str], tuple[str, str, str, str]]


def _add_k(rng: random.Random, f: str):
    k = rng.randint(2, 19)
    return "x", f"returns x plus {k}", f"return x + {k}", f"assert {f}(1) == {1 + k}\nassert {f}(-4) == {-4 + k}"


def _mul_k(rng: random.Random, f: str):
    k = rng.randint(2, 12)
    return "x", f"returns x multiplied by {k}", f"return x * {k}", f"assert {f}(3) == {3 * k}\nassert {f}(0) == 0"


def _divisible(rng: random.Random, f: str):
    k = rng.randint(2, 9)
    return ("n", f"returns True if n is divisible by {k} and False otherwise", f"return n % {k} == 0",
            f"assert {f}({k * 7}) is True\nassert {f}({k * 7 + 1}) is False")


def _sum_squares(rng: random.Random, f: str):
    return ("nums", "returns the sum of the squares of the numbers in the list nums",
            "return sum(x * x for x in nums)", f"assert {f}([1, 2, 3]) == 14\nassert {f}([]) == 0")


def _count_greater(rng: random.Random, f: str):
    k = rng.randint(0, 20)
    return ("nums", f"returns how many numbers in the list nums are greater than {k}",
            f"return sum(1 for x in nums if x > {k})",
            f"assert {f}([{k - 1}, {k}, {k + 1}, {k + 5}]) == 2\nassert {f}([]) == 0")


def _keep_even(rng: random.Random, f: str):
    return ("nums", "returns a new list with only the even numbers of the list nums, in order",
            "return [x for x in nums if x % 2 == 0]", f"assert {f}([1, 2, 3, 4, 6]) == [2, 4, 6]\nassert {f}([5]) == []")


def _reverse(rng: random.Random, f: str):
    return ("s", "returns the string s reversed", "return s[::-1]",
            f"assert {f}('abc') == 'cba'\nassert {f}('') == ''")


def _count_char(rng: random.Random, f: str):
    c = rng.choice("aeioustnr")
    return ("s", f"returns how many times the letter '{c}' appears in the string s", f"return s.count('{c}')",
            f"assert {f}('{c}x{c}{c}') == 3\nassert {f}('') == 0")


def _repeat(rng: random.Random, f: str):
    k = rng.randint(2, 5)
    return ("s", f"returns the string s repeated {k} times", f"return s * {k}",
            f"assert {f}('ab') == {'ab' * k!r}\nassert {f}('') == ''")


def _largest(rng: random.Random, f: str):
    return ("nums", "returns the largest number in the non-empty list nums", "return max(nums)",
            f"assert {f}([3, 9, 2]) == 9\nassert {f}([-5, -2]) == -2")


def _factorial(rng: random.Random, f: str):
    return ("n", "returns n factorial (the product 1 * 2 * ... * n, and 1 for n = 0)",
            "result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
            f"assert {f}(0) == 1\nassert {f}(5) == 120")


def _palindrome(rng: random.Random, f: str):
    return ("s", "returns True if the string s reads the same forwards and backwards, else False",
            "return s == s[::-1]", f"assert {f}('level') is True\nassert {f}('abc') is False")


def _first_k(rng: random.Random, f: str):
    k = rng.randint(1, 4)
    return ("items", f"returns the first {k} elements of the list items", f"return items[:{k}]",
            f"assert {f}([1, 2, 3, 4, 5]) == {[1, 2, 3, 4, 5][:k]}\nassert {f}([]) == []")


def _squares(rng: random.Random, f: str):
    return ("nums", "returns a list with the square of every number in nums", "return [x * x for x in nums]",
            f"assert {f}([1, 2, 3]) == [1, 4, 9]\nassert {f}([]) == []")


def _count_vowels(rng: random.Random, f: str):
    return ("s", "returns the number of vowels (a, e, i, o, u, lower case) in the string s",
            "return sum(1 for ch in s if ch in 'aeiou')", f"assert {f}('banana') == 3\nassert {f}('xyz') == 0")


def _sum_to_n(rng: random.Random, f: str):
    return ("n", "returns the sum of the integers from 1 to n", "return n * (n + 1) // 2",
            f"assert {f}(10) == 55\nassert {f}(1) == 1")


def _clamp(rng: random.Random, f: str):
    lo = rng.randint(0, 5)
    hi = lo + rng.randint(5, 20)
    return ("x", f"returns x limited to the range {lo} to {hi} (values below {lo} become {lo}, above {hi} become {hi})",
            f"return max({lo}, min({hi}, x))", f"assert {f}({lo - 3}) == {lo}\nassert {f}({hi + 4}) == {hi}\nassert {f}({lo + 1}) == {lo + 1}")


def _last_char(rng: random.Random, f: str):
    return ("s", "returns the last character of the non-empty string s", "return s[-1]",
            f"assert {f}('hello') == 'o'\nassert {f}('a') == 'a'")


TRAIN_FAMILIES: dict[str, Family] = {
    "add_k": _add_k, "mul_k": _mul_k, "divisible": _divisible, "sum_squares": _sum_squares,
    "count_greater": _count_greater, "keep_even": _keep_even, "reverse": _reverse, "count_char": _count_char,
    "repeat": _repeat, "largest": _largest, "factorial": _factorial, "palindrome": _palindrome,
    "first_k": _first_k, "squares": _squares, "count_vowels": _count_vowels,
}
HELDOUT_ONLY_FAMILIES: dict[str, Family] = {"sum_to_n": _sum_to_n, "clamp": _clamp, "last_char": _last_char}

TRAIN_NAMES = ["solve", "compute", "process", "transform", "helper", "calc", "do_task", "apply", "handle", "work"]
HELDOUT_NAMES = ["answer", "run_it", "my_function", "evaluate_value", "get_result"]
TRAIN_PHRASES = ["Write a Python function `{f}({arg})` that {desc}.", "Create a Python function named `{f}` taking `{arg}` that {desc}.",
                 "Define `{f}({arg})` in Python: it {desc}."]
HELDOUT_PHRASES = ["Implement `{f}({arg})`, a Python function which {desc}. Show the code."]


def make_function_task(family: Family, rng: random.Random, name: str) -> tuple[FunctionTask, str]:
    arg, desc, body, tests = family(rng, name)
    solution = f"def {name}({arg}):\n    {body}\n"
    return FunctionTask(name, desc, solution, tests), arg


def verify(tasks: list[FunctionTask]) -> None:
    """Run every reference solution against its tests (one sandboxed process); raise on failure."""
    run_many([t.solution + "\n" + t.tests for t in tasks])


# --- "what does this print" ------------------------------------------------------------------

WORDS = ["apple", "river", "python", "garden", "rocket", "banana", "silver", "window", "planet", "coffee"]


def make_snippet(rng: random.Random) -> str:
    kind = rng.randrange(8)
    a, b, n, k = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 6), rng.randint(1, 9)
    nums = [rng.randint(1, 20) for _ in range(rng.randint(3, 5))]
    w = rng.choice(WORDS)
    if kind == 0:
        return f"x = {a}\nfor i in range({n}):\n    x += {k}\nprint(x)"
    if kind == 1:
        return f"nums = {nums}\nprint(sum(nums))"
    if kind == 2:
        return f"s = '{w}'\nprint(s[::-1])"
    if kind == 3:
        return f"print({a * b + k} // {b}, {a * b + k} % {b})"
    if kind == 4:
        return f"def f(x):\n    return x * {b} + {k}\n\nprint(f({a}))"
    if kind == 5:
        return f"print([x * {k} for x in range({n})])"
    if kind == 6:
        return f"nums = {nums}\nprint(max(nums) - min(nums))"
    return f"s = '{w}'\nprint(len(s), s.upper())"


TRAIN_OUTPUT_PHRASES = ["What does this Python code print?\n```python\n{code}\n```",
                        "What is printed when this code runs?\n```python\n{code}\n```"]
HELDOUT_OUTPUT_PHRASE = "Tell me the exact output of the following Python program.\n```python\n{code}\n```"


def _snippets_with_outputs(rng: random.Random, n: int, exclude: set[str]) -> list[tuple[str, str]]:
    codes: list[str] = []
    seen = set(exclude)
    while len(codes) < n:
        code = make_snippet(rng)
        if code not in seen:
            seen.add(code)
            codes.append(code)
    outputs = run_many(codes)
    return [(c, o.strip()) for c, o in zip(codes, outputs)]


# --- public builders -------------------------------------------------------------------------


def _heldout_snippets(seed: int, n: int) -> list[tuple[str, str]]:
    return _snippets_with_outputs(random.Random(f"code-heldout-{seed}"), n, set())


def train_examples(n_functions: int, n_outputs: int, seed: int, heldout_outputs: int) -> list[Example]:
    rng = random.Random(f"code-train-{seed}")
    out, tasks = [], []
    families = list(TRAIN_FAMILIES.values())
    for i in range(n_functions):
        task, arg = make_function_task(families[i % len(families)], rng, rng.choice(TRAIN_NAMES))
        tasks.append(task)
        q = rng.choice(TRAIN_PHRASES).format(f=task.name, arg=arg, desc=task.description)
        out.append(_example(q, f"```python\n{task.solution}```"))
    verify(tasks)
    exclude = {c for c, _ in _heldout_snippets(seed, heldout_outputs)}
    for code, printed in _snippets_with_outputs(rng, n_outputs, exclude):
        q = rng.choice(TRAIN_OUTPUT_PHRASES).format(code=code)
        out.append(_example(q, f"It prints `{printed}`."))
    return out


def _example(question: str, answer: str) -> Example:
    return Example(({"role": "user", "content": question}, {"role": "assistant", "content": answer}), "code")


def heldout_items(n_functions: int, n_outputs: int, seed: int) -> list[EvalItem]:
    rng = random.Random(f"code-heldout-fn-{seed}")
    families = list(TRAIN_FAMILIES.values()) + list(HELDOUT_ONLY_FAMILIES.values())
    items, tasks = [], []
    for i in range(n_functions):
        family = families[(i * 7) % len(families)]
        task, arg = make_function_task(family, rng, HELDOUT_NAMES[i % len(HELDOUT_NAMES)])
        tasks.append(task)
        q = HELDOUT_PHRASES[0].format(f=task.name, arg=arg, desc=task.description)
        items.append(EvalItem("code_functions", "code", q, task.tests, "python", 128))
    verify(tasks)
    for code, printed in _heldout_snippets(seed, n_outputs):
        items.append(EvalItem("code_output", "code", HELDOUT_OUTPUT_PHRASE.format(code=code), printed, "output", 48))
    return items


# --- the large held-out set ------------------------------------------------------------------

# Names and wording of the large set only, beside HELDOUT_NAMES/HELDOUT_PHRASES: 18 families,
# 5 names and one phrase give at most 90 different requests, too few for it.
LARGE_HELDOUT_NAMES = ["result_of", "my_func", "output_value", "find_answer", "func_a", "value_for", "check_it",
                       "make_result", "give_back", "f_value"]
LARGE_HELDOUT_PHRASES = ["Please write a Python function `{f}({arg})`; it {desc}.",
                         "I need Python code: a function `{f}` with parameter `{arg}` which {desc}.",
                         "Give me the Python function `{f}({arg})`. It {desc}."]
HELDOUT_WORDS = ["lemon", "tiger", "castle", "pencil", "orange", "bottle", "forest", "marble", "candle", "guitar"]


def make_heldout_snippet(rng: random.Random) -> str:
    """A "what does this print" program of a shape training never shows (make_snippet's shapes
    are all training's), so the large set's outputs are held out by construction."""
    kind = rng.randrange(7)
    a, b, k = rng.randint(2, 40), rng.randint(2, 9), rng.randint(1, 9)
    nums = [rng.randint(1, 30) for _ in range(rng.randint(3, 5))]
    w = rng.choice(HELDOUT_WORDS)
    if kind == 0:
        return f"words = {rng.sample(HELDOUT_WORDS, 3)}\nprint('-'.join(words))"
    if kind == 1:
        return f"d = {{'a': {a}, 'b': {b}}}\nprint(d['a'] - d['b'])"
    if kind == 2:
        return f"n = {a}\ncount = 0\nwhile n > {k}:\n    n -= {b}\n    count += 1\nprint(count)"
    if kind == 3:
        return f"nums = {nums}\nprint(sorted(nums)[{rng.randrange(len(nums))}])"
    if kind == 4:
        i = rng.randint(0, 2)
        return f"s = '{w}'\nprint(s[{i}:{i + rng.randint(2, 3)}])"
    if kind == 5:
        return f"t = ({a}, {b}, {k})\nprint(len(t) + t[1])"
    c = rng.choice(w)
    return f"s = '{w}'\nprint(s.count('{c}'), s.find('{c}'))"


def _large_function_items(n: int, seed: int) -> list[EvalItem]:
    """``n`` different requests over every family, held-out names and wording (checked tests)."""
    rng = random.Random(f"code-heldout-fn-large-{seed}")
    families = list(TRAIN_FAMILIES.values()) + list(HELDOUT_ONLY_FAMILIES.values())
    names, phrases = HELDOUT_NAMES + LARGE_HELDOUT_NAMES, HELDOUT_PHRASES + LARGE_HELDOUT_PHRASES
    items: list[EvalItem] = []
    tasks: list[FunctionTask] = []
    i = 0
    while len(items) < n:
        task, arg = make_function_task(families[i % len(families)], rng, rng.choice(names))
        i += 1
        q = rng.choice(phrases).format(f=task.name, arg=arg, desc=task.description)
        if any(it.prompt == q for it in items):
            continue
        tasks.append(task)
        items.append(EvalItem("code_functions", "code", q, task.tests, "python", 128))
    verify(tasks)
    return items


def large_heldout_items(n_functions: int, n_outputs: int, seed: int) -> list[EvalItem]:
    """The large held-out set's code: function requests as :func:`heldout_items` makes them, with
    more held-out names and phrasings, and output questions on held-out program shapes only."""
    codes: list[str] = []
    rng = random.Random(f"code-heldout-output-large-{seed}")
    while len(codes) < n_outputs:
        code = make_heldout_snippet(rng)
        if code not in codes:
            codes.append(code)
    outputs = run_many(codes)
    return _large_function_items(n_functions, seed) + [
        EvalItem("code_output", "code", HELDOUT_OUTPUT_PHRASE.format(code=c), o.strip(), "output", 48)
        for c, o in zip(codes, outputs)]
