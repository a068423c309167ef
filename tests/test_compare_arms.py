"""``python -m training compare``: arms of seeds, their spread and the bootstrap interval (#16)."""

from __future__ import annotations

import json
import random

import pytest

from training.__main__ import main
from training.compare import Arm, compare, load_replies, parse_arm

SUITES = {"arithmetic": "maths", "code_output": "code", "knowledge": "general", "tool_call": "tools"}


def _rows(p_correct: dict[str, float], n: int, rng: random.Random) -> list[dict]:
    return [{"suite": suite, "prompt": f"{suite} {i}", "expected": "x", "reply": "x",
             "correct": rng.random() < p_correct[domain]}
            for suite, domain in SUITES.items() for i in range(n)]


def _report(replies: dict[str, list[dict]], heldout: str = "large") -> dict:
    suites = {s: {"domain": d} for s, d in SUITES.items()}
    return {"config": {"heldout": heldout, "seed": 0, "serving": "defaults"},
            "models": [{"label": label, "suites": suites} for label in replies], "replies": replies}


def _arms(p_first: dict[str, float], p_second: dict[str, float], n: int = 400, seeds: int = 3):
    rng = random.Random(7)
    replies = {f"a{s}": _rows(p_first, n, rng) for s in range(seeds)}
    replies |= {f"b{s}": _rows(p_second, n, rng) for s in range(seeds)}
    first, second = Arm("pesc", tuple(f"a{s}" for s in range(seeds))), Arm("dense", tuple(f"b{s}" for s in range(seeds)))
    return replies, first, second


def test_a_clear_gap_is_detected_and_sized():
    p_a = {"maths": 0.7, "code": 0.5, "general": 0.9, "tools": 0.6}
    p_b = {"maths": 0.5, "code": 0.5, "general": 0.9, "tools": 0.6}
    replies, first, second = _arms(p_a, p_b)
    result = compare(replies, dict(SUITES), first, second, rounds=2000)
    maths = result["domains"]["maths"]["difference"]
    assert maths["ci95"][0] > 5 and 10 < maths["points"] < 30 and maths["ci95"][0] < maths["points"] < maths["ci95"][1]
    assert "maths: pesc ahead" in result["verdict"]
    for domain in ("code", "general", "tools"):
        lo, hi = result["domains"][domain]["difference"]["ci95"]
        assert lo < 0 < hi, domain
        assert f"{domain}: no detectable difference" in result["verdict"]
    assert result["domains"]["maths"]["items"] == 400
    assert len(result["domains"]["maths"]["pesc"]["seeds"]) == 3


def test_the_interval_widens_with_the_seeds_spread():
    """Seeds that disagree widely are training noise the interval must carry, not only item noise."""
    rng = random.Random(1)
    p = {"maths": 0.6, "code": 0.6, "general": 0.6, "tools": 0.6}
    steady = {f"a{s}": _rows(p, 300, rng) for s in range(3)} | {f"b{s}": _rows(p, 300, rng) for s in range(3)}
    wild = dict(steady)
    wild["a0"] = _rows({d: 0.3 for d in p}, 300, rng)
    wild["a2"] = _rows({d: 0.9 for d in p}, 300, rng)
    arms = Arm("pesc", ("a0", "a1", "a2")), Arm("dense", ("b0", "b1", "b2"))
    width = {}
    for name, replies in (("steady", steady), ("wild", wild)):
        lo, hi = compare(replies, dict(SUITES), *arms, rounds=2000)["domains"]["maths"]["difference"]["ci95"]
        width[name] = hi - lo
    assert width["wild"] > 2 * width["steady"]


def test_identical_arms_differ_by_nothing():
    """Paired items: one model against itself has no item noise; the same seeds drawn apart
    leave only the seeds' own spread, centred on zero."""
    replies, first, _ = _arms({d: 0.5 for d in SUITES.values()}, {d: 0.5 for d in SUITES.values()})
    one = Arm("one", first.labels[:1])
    for row in compare(replies, dict(SUITES), one, Arm("same", one.labels), rounds=500)["domains"].values():
        assert row["difference"] == {"points": 0.0, "ci95": [0.0, 0.0]}
    for row in compare(replies, dict(SUITES), first, Arm("same", first.labels), rounds=500)["domains"].values():
        lo, hi = row["difference"]["ci95"]
        assert row["difference"]["points"] == 0.0 and lo < 0 < hi and abs(lo + hi) < 0.5 * (hi - lo)


def test_cli_writes_table_and_json(tmp_path, capsys):
    replies, first, second = _arms({d: 0.8 for d in SUITES.values()}, {d: 0.2 for d in SUITES.values()}, n=50)
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(_report({k: v for k, v in replies.items() if k.startswith("a")})))
    b.write_text(json.dumps(_report({k: v for k, v in replies.items() if k.startswith("b")})))
    for seed, mi in enumerate((0.1, 0.2, 0.3)):  # what eval writes for each PESC model, next to its report
        share = {d: [[1 / 4] * 4 for _ in range(2)] for d in SUITES.values()}
        share["tools"][1] = [0.7, 0.1, 0.1, 0.1]  # layer 1, expert 0 takes the tools domain
        (tmp_path / f"routing_a{seed}.json").write_text(json.dumps(
            {"share": share, "domain_expert_mutual_information_bits": [0.01, mi], "domain_entropy_bits": 2.0}))
    out = tmp_path / "out"
    assert main(["compare", str(a), str(b), "--arm", "PESC=a0,a1,a2", "--arm", "dense=b0,b1,b2",
                 "--rounds", "500", "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["domains"]["macro"]["difference"]["ci95"][0] > 40
    table = (out / "compare_table.md").read_text()
    assert "| maths | 50 |" in table and "**macro mean**" in table
    assert result["routing"]["mutual_information_bits"][1] == {"layer": 1, "mean": 0.2, "min": 0.1, "max": 0.3}
    assert "highest in layers 1 (0.200, seeds 0.100-0.300)" in table
    assert "| tools | a0: 1/0, 70.0% vs 25.0%; a1: 1/0" in table
    assert "PESC ahead" in capsys.readouterr().out


@pytest.mark.parametrize("arms, message", [
    (["--arm", "PESC=a0"], "exactly twice"),
    (["--arm", "PESC=a0", "--arm", "dense"], "NAME=label1"),
    (["--arm", "PESC=a0", "--arm", "dense=zz"], "no model labelled 'zz'"),
])
def test_cli_names_a_bad_arm(tmp_path, capsys, arms, message):
    replies, _, _ = _arms({d: 0.5 for d in SUITES.values()}, {d: 0.5 for d in SUITES.values()}, n=5)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_report(replies)))
    assert main(["compare", str(path), *arms, "--rounds", "100", "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_reports_of_different_heldout_sets_or_items_are_refused(tmp_path):
    replies, first, second = _arms({d: 0.5 for d in SUITES.values()}, {d: 0.5 for d in SUITES.values()}, n=5)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_report({"a0": replies["a0"]}, "large")))
    b.write_text(json.dumps(_report({"b0": replies["b0"]}, "standard")))
    with pytest.raises(ValueError, match="different held-out sets"):
        load_replies([a, b])
    shifted = dict(replies, b1=replies["b1"][1:] + replies["b1"][:1])
    with pytest.raises(ValueError, match="other items"):
        compare(shifted, dict(SUITES), first, second, rounds=100)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: no 'replies'"):
        load_replies([bad])
    with pytest.raises(ValueError, match="NAME=label1"):
        parse_arm("=a,b")
