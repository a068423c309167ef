"""PESC against the dense control over several seeds: mean, spread and a bootstrap interval.

One seed cannot tell two tuned models a few points apart: the run-to-run spread of a 135M
model's tune is itself a few points.  So each arm (e.g. three PESC seeds, three dense seeds)
is a set of models scored on the *same* held-out items (``python -m training eval`` reports),
and the difference of the arms' accuracies per domain gets a 95% interval from a two-level
bootstrap: each round draws the seeds of each arm with replacement (the training noise) and
the items with replacement, the same items for both arms (paired: an item hard for one arm is
hard for the other, which is most of the item noise).  A domain's accuracy is the mean over
its items, as in the eval tables, so the macro mean weights domains equally.
"""

from __future__ import annotations

import json
from statistics import fmean
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.evaluate import DOMAINS, routing_path


@dataclass(frozen=True)
class Arm:
    """A name and the eval labels of its seeds."""

    name: str
    labels: tuple[str, ...]


def parse_arm(text: str) -> Arm:
    """``NAME=label1,label2,...`` (the ``--arm`` flag)."""
    name, sep, labels = text.partition("=")
    members = tuple(x for x in labels.split(",") if x)
    if not sep or not name or not members:
        raise ValueError(f"--arm must look like NAME=label1,label2 (got {text!r})")
    return Arm(name, members)


def load_replies(paths: list[Path]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Every model's scored replies from one or more eval.json files, keyed by label, and each
    suite's domain as the reports give it."""
    replies: dict[str, list[dict]] = {}
    suite_domain: dict[str, str] = {}
    configs = {}
    for path in paths:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable eval.json ({e})") from e
        if not isinstance(report, dict) or "replies" not in report:
            raise ValueError(f"{path}: no 'replies' (write it with python -m training eval)")
        cfg = report.get("config", {})
        configs[path] = (cfg.get("heldout"), cfg.get("seed"), cfg.get("serving"))
        for model in report.get("models", []):
            suite_domain.update({suite: v["domain"] for suite, v in model.get("suites", {}).items()})
        for label, rows in report["replies"].items():
            if label in replies:
                raise ValueError(f"{path}: label {label!r} appears in more than one report")
            replies[label] = rows
    if len(set(configs.values())) > 1:
        raise ValueError("the reports were scored on different held-out sets or serving profiles: "
                         + "; ".join(f"{p}: heldout/seed/serving={c}" for p, c in configs.items()))
    return replies, suite_domain


def correctness(replies: dict[str, list[dict]], suite_domain: dict[str, str],
                arms: list[Arm]) -> dict[str, dict[str, list[list[int]]]]:
    """Per domain, per arm: one 0/1 list over the domain's items per seed, all in one item order."""
    keys = None
    for arm in arms:
        for label in arm.labels:
            if label not in replies:
                raise ValueError(f"arm {arm.name}: no model labelled {label!r} in the reports "
                                 f"(labels: {', '.join(sorted(replies))})")
            rows_keys = [(r["suite"], r["prompt"]) for r in replies[label]]
            if keys is None:
                keys = rows_keys
            elif rows_keys != keys:
                raise ValueError(f"{label!r} was scored on other items than {arms[0].labels[0]!r}: "
                                 "compare reports of one held-out set")
    out: dict[str, dict[str, list[list[int]]]] = {}
    for domain in DOMAINS:
        index = [i for i, (suite, _) in enumerate(keys or []) if suite_domain.get(suite) == domain]
        if index:
            out[domain] = {arm.name: [[int(replies[label][i]["correct"]) for i in index] for label in arm.labels]
                           for arm in arms}
    return out


def bootstrap_difference(a: list[list[int]], b: list[list[int]], rounds: int,
                         rng: np.random.Generator) -> np.ndarray:
    """``rounds`` draws of accuracy(a) - accuracy(b) in points: the seeds of each arm and the
    shared items resampled with replacement (as multiplicities: every round at once, in two matmuls)."""
    A, B = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = A.shape[1]
    items = rng.multinomial(n, np.full(n, 1.0 / n), size=rounds) / n  # (rounds, n) item weights
    seeds_a = rng.multinomial(len(A), np.full(len(A), 1.0 / len(A)), size=rounds) / len(A)
    seeds_b = rng.multinomial(len(B), np.full(len(B), 1.0 / len(B)), size=rounds) / len(B)
    return 100.0 * ((seeds_a * (items @ A.T)).sum(1) - (seeds_b * (items @ B.T)).sum(1))


def compare(replies: dict[str, list[dict]], suite_domain: dict[str, str], first: Arm, second: Arm,
            rounds: int = 10000, seed: int = 0) -> dict:
    """Per domain and macro-averaged: each arm's per-seed accuracies, mean and spread, and the
    difference ``first - second`` in points with its 95% two-level bootstrap interval."""
    if rounds < 100:
        raise ValueError(f"--rounds must be at least 100, got {rounds}")
    data = correctness(replies, suite_domain, [first, second])
    rng = np.random.default_rng(seed)
    report: dict[str, dict] = {}
    macro_draws: list[np.ndarray] = []
    points: list[float] = []
    for domain, arms in data.items():
        row = {"items": len(arms[first.name][0])}
        accs = {a.name: [100.0 * fmean(s) for s in arms[a.name]] for a in (first, second)}
        for name, xs in accs.items():
            row[name] = {"seeds": [round(x, 1) for x in xs], "mean": round(fmean(xs), 2),
                         "spread": round(max(xs) - min(xs), 1)}
        draws = bootstrap_difference(arms[first.name], arms[second.name], rounds, rng)
        macro_draws.append(draws)
        points.append(fmean(accs[first.name]) - fmean(accs[second.name]))
        row["difference"] = _interval(points[-1], draws)
        report[domain] = row
    if macro_draws:
        point = fmean(points)
        report["macro"] = {"difference": _interval(point, np.mean(macro_draws, axis=0))}
    return {"arms": {first.name: list(first.labels), second.name: list(second.labels)}, "rounds": rounds,
            "domains": report, "verdict": verdict(report, first.name, second.name)}


def _interval(point: float, draws: np.ndarray) -> dict:
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"points": round(float(point), 2), "ci95": [round(float(lo), 2), round(float(hi), 2)]}


def verdict(report: dict[str, dict], first: str, second: str) -> str:
    """One plain sentence per domain: ahead, behind, or not told apart (the interval holds 0)."""
    parts = []
    for domain, row in report.items():
        d = row["difference"]
        lo, hi = d["ci95"]
        if lo > 0:
            word = f"{first} ahead"
        elif hi < 0:
            word = f"{second} ahead"
        else:
            word = "no detectable difference"
        parts.append(f"{domain}: {word} ({d['points']:+.1f} points, 95% CI {lo:+.1f} to {hi:+.1f})")
    return "; ".join(parts)


def markdown(result: dict) -> str:
    first, second = result["arms"]
    lines = [f"| domain | items | {first}: seeds | {first} mean | {second}: seeds | {second} mean | "
             f"{first} − {second} (95% CI) |", "|---|---|---|---|---|---|---|"]
    for domain, row in result["domains"].items():
        d = row["difference"]
        ci = f"{d['points']:+.1f} ({d['ci95'][0]:+.1f} to {d['ci95'][1]:+.1f})"
        if domain == "macro":
            lines.append(f"| **macro mean** | | | | | | **{ci}** |")
            continue
        cells = [", ".join(f"{x:.1f}" for x in row[a]["seeds"]) for a in (first, second)]
        lines.append(f"| {domain} | {row['items']} | {cells[0]} | {row[first]['mean']:.1f} | {cells[1]} | "
                     f"{row[second]['mean']:.1f} | {ci} |")
    return "\n".join(lines) + "\n"


def routing_over_seeds(routing: dict[str, dict]) -> dict:
    """What the seeds' routing (``routing_<label>.json`` of the eval) says together: per layer,
    the mutual information between domain and expert (mean, min, max over seeds), and per
    domain its most specialised expert in each seed (the largest share of the domain's slots
    over that expert's share of the other domains' slots)."""
    seeds = list(routing.values())
    layers = len(seeds[0]["domain_expert_mutual_information_bits"])
    mi = [[r["domain_expert_mutual_information_bits"][layer] for r in seeds] for layer in range(layers)]
    specialists: dict[str, list[dict]] = {}
    for label, r in routing.items():
        for domain, share in r["share"].items():
            others = [r["share"][d] for d in r["share"] if d != domain]
            best = None
            for layer, row in enumerate(share):
                for expert, v in enumerate(row):
                    rest = fmean([o[layer][expert] for o in others]) if others else 0.0
                    ratio = v / max(rest, 1e-6)
                    if best is None or ratio > best["ratio"]:
                        best = {"seed": label, "layer": layer, "expert": expert, "share": round(v, 4),
                                "others_share": round(rest, 4), "ratio": round(ratio, 2)}
            specialists.setdefault(domain, []).append(best)
    return {"seeds": list(routing), "domain_entropy_bits": seeds[0]["domain_entropy_bits"],
            "mutual_information_bits": [{"layer": layer, "mean": round(fmean(v), 4), "min": min(v), "max": max(v)}
                                        for layer, v in enumerate(mi)],
            "specialists": specialists}


def routing_markdown(stats: dict) -> str:
    rows = stats["mutual_information_bits"]
    top = sorted(rows, key=lambda r: -r["mean"])[:3]
    lines = [f"Routing over {len(stats['seeds'])} seed(s): mutual information between domain and expert, "
             f"bits per layer (the domains' entropy, its ceiling: {stats['domain_entropy_bits']:.2f}); mean over "
             f"layers {fmean([r['mean'] for r in rows]):.3f}, highest in layers "
             + ", ".join(f"{r['layer']} ({r['mean']:.3f}, seeds {r['min']:.3f}-{r['max']:.3f})" for r in top) + ".",
             "", "| domain | most specialised expert per seed: layer/expert, share of the domain's slots vs the others' |",
             "|---|---|"]
    for domain, best in stats["specialists"].items():
        lines.append(f"| {domain} | " + "; ".join(
            f"{b['seed']}: {b['layer']}/{b['expert']}, {100 * b['share']:.1f}% vs {100 * b['others_share']:.1f}%"
            for b in best) + " |")
    return "\n".join(lines) + "\n"


def run_compare(reports: list[Path], first: Arm, second: Arm, out_dir: Path, rounds: int, seed: int,
                log=print) -> dict:
    """Read the eval reports, compare the arms and write ``compare.json`` and ``compare_table.md``
    (with the routing of the first arm's seeds when the eval wrote it next to a report)."""
    result = compare(*load_replies(reports), first, second, rounds, seed)
    result["reports"] = [str(p) for p in reports]
    routing = {}
    for label in first.labels:
        found = [routing_path(p.parent, label) for p in reports if routing_path(p.parent, label).is_file()]
        if found:
            routing[label] = json.loads(found[0].read_text())
    if routing:
        result["routing"] = routing_over_seeds(routing)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result) + ("\n" + routing_markdown(result["routing"]) if routing else "")
    (out_dir / "compare_table.md").write_text(table)
    log(table)
    log("verdict: " + result["verdict"])
    return result
