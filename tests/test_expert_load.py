"""The router-load metric files each step's choices and counts them in batches: what a scrape
sees must be every routed token so far, per model, whatever the batching."""

from __future__ import annotations

import threading

import torch

from pesc_serve.engine.expert_load import FOLD_EVERY, ExpertLoad

LAYERS = 3
OWNERS = {0: ("camelidae", 4), 2: ("other", 6)}  # slot -> (name, experts); slot 1 is the base


def _direct(steps: list[tuple[torch.Tensor, list[int]]]) -> dict[str, torch.Tensor]:
    counts = {name: torch.zeros(LAYERS, e, dtype=torch.long) for name, e in OWNERS.values()}
    for ids, slots in steps:
        for row, slot in enumerate(slots):
            if slot not in OWNERS:
                continue
            name, _ = OWNERS[slot]
            for layer in range(LAYERS):
                for e in ids[layer, row].tolist():
                    if e >= 0:
                        counts[name][layer, e] += 1
    return counts


def _step(gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    rows = int(torch.randint(1, 5, (), generator=gen))
    k = int(torch.randint(1, 3, (), generator=gen))  # the width changes from step to step
    slots = torch.randint(0, 3, (rows,), generator=gen).tolist()
    ids = torch.randint(0, 4, (LAYERS, rows, k), generator=gen)
    for row, slot in enumerate(slots):
        if slot == 1:
            ids[:, row] = -1  # the base routes nothing
    ids[:, :, -1][torch.rand(LAYERS, rows, generator=gen) < 0.3] = -1  # fewer experts than the width
    return ids, slots


def test_counts_match_every_step_across_folds_and_scrapes():
    load = ExpertLoad(LAYERS, lambda: list(OWNERS.values()))
    gen = torch.Generator().manual_seed(0)
    steps = []
    for i in range(3 * FOLD_EVERY + 7):
        steps.append(_step(gen))
        load.record([steps[-1]], OWNERS.get)
        if i in (5, FOLD_EVERY + 1):  # scrapes in between fold early
            got = load.snapshot()
            assert all(torch.equal(got[n], c) for n, c in _direct(steps).items())
    got = load.snapshot()
    want = _direct(steps)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_a_scrape_from_another_thread_sees_a_consistent_count():
    load = ExpertLoad(1, lambda: [("m", 2)])
    ids = torch.zeros(1, 1, 1, dtype=torch.long)
    total = 5 * FOLD_EVERY
    seen: list[int] = []

    def scrape():
        while len(seen) < 200:
            seen.append(int(load.snapshot()["m"].sum()))

    t = threading.Thread(target=scrape)
    t.start()
    for _ in range(total):
        load.record([(ids, [0])], lambda slot: ("m", 2))
    t.join()
    assert seen == sorted(seen) and int(load.snapshot()["m"].sum()) == total
