"""The held-out sets: the standard one pinned, the large one big, distinct and disjoint from training."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import pytest

from training.data import Example
from training.evaluate import DOMAINS, SUITE_ORDER, EvalConfig, heldout_items
from training.tasks import arithmetic, code, general, tools
from training.tasks.knowledge_large import KNOWLEDGE_LARGE, LARGE_COUNTRIES

# sha256 of the standard set's items (to_json, sort_keys) taken before the large set existed:
# every published table scores exactly these 362 items in this order.
STANDARD_SHA256 = "42b7ea539f516dcb215a3ae6c077d1b30158897191d90fc633618a9927dd898e"
# Other names the probe may use for a country.
COUNTRY_ALIASES = {"United Kingdom": "GB", "UK": "GB", "England": "GB", "Scotland": "GB", "Wales": "GB",
                   "USA": "US", "Holland": "NL", "South Korea": "KR", "North Korea": "KP", "Burma": "MM",
                   "Czechia": "CZ", "Ivory Coast": "CI", "Vatican": "VA"}


def _digest(items) -> str:
    blob = json.dumps([it.to_json() for it in items], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@pytest.fixture(scope="module")
def large():
    return heldout_items(EvalConfig(heldout="large"))


@pytest.fixture(scope="module")
def training_examples():
    """What ``python -m training data`` generates, without the chat replay's model answers."""
    from training.mixture import MixtureConfig, build_mixture

    cfg = MixtureConfig(arithmetic=600, word_problems=120, code_functions=90, code_outputs=450, module_facts=20,
                        country_codes=150, chat=0, tool_calls=200, tool_no_fit=60, tool_results=100)
    return build_mixture(cfg, base=None, log=lambda s: None)[0]


def _user_texts(examples) -> list[str]:
    return [m["content"] for ex in examples for m in ex.messages if m["role"] == "user"]


def test_standard_set_is_unchanged():
    items = heldout_items(EvalConfig())
    assert len(items) == 362
    assert _digest(items) == STANDARD_SHA256
    assert heldout_items(EvalConfig(heldout="standard")) == items


def test_large_set_sizes(large):
    by_domain = Counter(it.domain for it in large)
    by_suite = Counter(it.suite for it in large)
    assert len(large) >= 1000
    assert set(by_domain) == set(DOMAINS) and min(by_domain.values()) >= 300, by_domain
    assert set(by_suite) == set(SUITE_ORDER), by_suite
    # Each domain spread over its suites, none a token few.
    assert min(by_suite.values()) >= 80, by_suite


def test_large_set_has_no_duplicates_and_is_deterministic(large):
    for suite in SUITE_ORDER:
        prompts = [it.prompt for it in large if it.suite == suite]
        dupes = [p for p, n in Counter(prompts).items() if n > 1]
        assert not dupes, (suite, dupes[:3])
    assert _digest(heldout_items(EvalConfig(heldout="large"))) == _digest(large)
    other = heldout_items(EvalConfig(heldout="large", seed=1, suites=("arithmetic",)))
    assert [it.prompt for it in other] != [it.prompt for it in large if it.suite == "arithmetic"]


def test_unknown_heldout_set():
    with pytest.raises(ValueError, match="unknown held-out set"):
        heldout_items(EvalConfig(heldout="huge"))


def test_large_set_shares_no_question_with_generated_training(training_examples, large):
    from training.mixture import check_disjoint, check_disjoint_all

    train = set(_user_texts(training_examples))
    assert not [it.prompt for it in large if it.prompt in train]
    assert check_disjoint(training_examples, EvalConfig(heldout="large")) == 0
    assert check_disjoint_all(training_examples, 0) == 0
    leaked = [Example(({"role": "user", "content": large[-1].prompt}, {"role": "assistant", "content": "x"}))]
    assert check_disjoint_all(leaked, 0) == 1


def _arithmetic_triple(item) -> tuple[str, int, int]:
    """(op, a, b) of a held-out maths item, read back through the template that wrote it."""
    templates = [(op, t) for op, ts in arithmetic.HELDOUT_TEMPLATES.items() for t in ts]
    templates += list(arithmetic.HELDOUT_WORD.items())
    for op, t in templates:
        pattern = re.escape(t).replace(re.escape("{a}"), r"(?P<a>\d+)").replace(re.escape("{b}"), r"(?P<b>\d+)")
        m = re.fullmatch(pattern, item.prompt)
        if m:
            return op, int(m["a"]), int(m["b"])
    raise AssertionError(f"no held-out template wrote {item.prompt!r}")


def test_large_maths_uses_reserved_operands_only(large, training_examples):
    maths = [it for it in large if it.domain == "maths"]
    for it in maths:
        op, a, b = _arithmetic_triple(it)
        assert arithmetic.is_heldout(op, a, b), it.prompt
        assert int(it.answer) == arithmetic.compute(op, a, b)
    trained = set()
    for ex in training_examples:
        if ex.domain == "maths":
            m = re.search(r"(\d+) ([-+*]) (\d+)", ex.messages[-1]["content"])
            trained.add((m[2], int(m[1]), int(m[3])))
    assert trained and not trained & {_arithmetic_triple(it) for it in maths}


def test_large_code_uses_heldout_names_phrases_and_programs(large, training_examples):
    assert not set(code.LARGE_HELDOUT_NAMES) & set(code.TRAIN_NAMES)
    train_phrases = " ".join(code.TRAIN_PHRASES)
    for phrase in code.LARGE_HELDOUT_PHRASES:
        assert phrase.split(" `{f}")[0] not in train_phrases, phrase
    train_text = "\n".join(_user_texts(training_examples))
    for it in (it for it in large if it.suite == "code_functions"):
        name = re.search(r"`(\w+)", it.prompt)[1]
        assert name in code.HELDOUT_NAMES + code.LARGE_HELDOUT_NAMES, it.prompt
    programs = [re.search(r"```python\n(.*?)\n```", it.prompt, re.DOTALL)[1]
                for it in large if it.suite == "code_output"]
    assert len(programs) == len(set(programs)) and not [p for p in programs if p in train_text]
    assert all(it.answer for it in large if it.suite == "code_output")


@pytest.mark.parametrize("heldout", ["standard", "large"])
def test_heldout_tools_are_new_tools_with_new_argument_names(heldout, large):
    train_names = {n for t in tools.TRAIN_TASKS for n in t.names()}
    train_args = {k for t in tools.TRAIN_TASKS for k in t.argument_names()}
    items = large if heldout == "large" else heldout_items(EvalConfig())
    held = [it for it in items if it.domain == "tools"]
    assert {it.suite for it in held} == {"tool_call", "tool_no_call", "tool_result"}
    for it in held:
        names = {t["function"]["name"] for t in it.tools}
        args = {k for t in it.tools for k in t["function"]["parameters"]["properties"]}
        assert not names & train_names and not args & train_args, it.prompt


def _mentioned_countries(text: str) -> set[str]:
    names = {**{n: c for c, n in _all_country_names().items()}, **COUNTRY_ALIASES}
    return {c for n, c in names.items() if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text)}


def _all_country_names() -> dict[str, str]:
    """tzdata's names as country_names() spells them, excluded countries included."""
    rows = (general._tz_dir() / "iso3166.tab").read_text(encoding="utf-8").splitlines()
    return {r.split("\t")[0]: r.split("\t")[1].split(" (")[0].replace("&", "and") for r in rows if r and r[0] != "#"}


def test_large_knowledge_probe_is_new_and_its_countries_stay_out_of_training(training_examples):
    questions = [q for q, _ in KNOWLEDGE_LARGE]
    assert len(questions) == len(set(questions)) and len(general.KNOWLEDGE) + len(questions) >= 300
    assert not set(questions) & ({q for q, _ in general.KNOWLEDGE} | set(general.FACT_PROMPTS))
    mentioned = set().union(*(_mentioned_countries(f"{q} {a}") for q, a in KNOWLEDGE_LARGE))
    assert mentioned <= general.EXCLUDED_COUNTRIES, sorted(mentioned - general.EXCLUDED_COUNTRIES)
    assert LARGE_COUNTRIES <= general.EXCLUDED_COUNTRIES
    assert not set(general.country_names()) & general.EXCLUDED_COUNTRIES
    # Nor do the training tools' countries (a made-up GDP is a "fact" about one).
    assert not [n for n in tools.NATIONS if any(n in f"{q} {a}" for q, a in KNOWLEDGE_LARGE)]
    names = [n for c, n in _all_country_names().items() if c in mentioned]
    replay = set(general.chat_prompts(10**6, 0))
    assert not set(questions) & replay
    assert not [n for n in names for t in general.COUNTRY_TEMPLATES if t.format(c=n) in replay]
    assert not [p for p in general.FACT_PROMPTS if _mentioned_countries(p) & mentioned]
    train = set(_user_texts(training_examples))
    assert [q for q in train if "ISO 3166" in q]
    assert not [n for n in names for t in general.CODE_TEMPLATES if t.format(country=n) in train]


def test_replay_avoids_the_topics_the_probe_names():
    skipped = general.probed_topics()
    assert {"dogs", "the moon"} <= skipped and "kindness" not in skipped
    replay = set(general.chat_prompts(10**6, 0))
    assert not [t.format(t=topic) for topic in skipped for t in general.CHAT_TEMPLATES if t.format(t=topic) in replay]
    assert "Why is kindness important?" in replay


def test_large_tool_no_call_questions_are_probe_questions(large):
    probe = {it.prompt for it in large if it.suite == "knowledge"}
    assert {it.prompt for it in large if it.suite == "tool_no_call"} <= probe


def test_eval_cli_offers_the_large_set(capsys):
    from training.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", "smollm2", "--heldout", "huge"])
    assert exc.value.code == 2 and "choose from 'standard', 'large'" in capsys.readouterr().err
