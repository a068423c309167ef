"""What users get is the model that was trained: the bundled camelidae served with the default
flags (int4 base, unmerged LoRA, C++ kernels, float16 KV cache) answers the large held-out set's
240 arithmetic items within 3 points of the same delta in exact float32.  On the standard set's
90 a few greedy answers flipping either way moved the gap by 4 points (v7: 59 against 63 of 90,
but 153 against 149 of 240).

Before the LoRA ran unmerged, the default server merged it into the weights and re-quantized
them to int4, which rounded most of the update away: 20% against the exact 50%.
"""

from __future__ import annotations

import pytest

from training.evaluate import EvalConfig, heldout_items, evaluate_model

# About five minutes on 2 idle cores, far more beside other CPU-heavy work (the exact side is the
# float32 PyTorch path): the suite's 600 s hang guard is too short for a busy machine here.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _arithmetic(serving: str) -> dict:
    cfg = EvalConfig(serving=serving, suites=("arithmetic",), heldout="large")
    return evaluate_model(serving, "camelidae", heldout_items(cfg), cfg).suites["arithmetic"]


def test_default_serving_keeps_the_trained_arithmetic():
    # The exact reference runs offline (float32, fixed batches: the same answers every run, and
    # item for item those of the server in exact float32, see the README); the default kernels
    # are batch-invariant, so 16 requests in flight give reproducible answers too.
    exact, default = _arithmetic("offline"), _arithmetic("defaults")
    assert exact["total"] == default["total"] == 240
    assert exact["accuracy"] >= 40.0  # the delta's training shows (its base scores ~11)
    assert abs(default["accuracy"] - exact["accuracy"]) <= 3.0, (default, exact)



def test_the_bundled_model_uses_tools_on_held_out_tools():
    """The shipped delta's tool use, served with the default flags and tool_choice auto, on tools,
    argument names and phrasings it never saw: the right tool with the right key argument, an
    answer without a call when no tool fits, a reply that uses the tool's result.

    The floors are what v6 kept with a few items of slack (measured 31, 40 and 33 of 40; v7 32,
    40 and 34; the shipped v10 33, 40 and 35; v3 scored 29, 36 and 26, and v1, which had no tool
    training, 7, 36 and 0).  Issue #13's target for the first is 80% (README, "Tool use")."""
    cfg = EvalConfig(serving="defaults", suites=("tool_call", "tool_no_call", "tool_result"))
    suites = evaluate_model("defaults", "camelidae", heldout_items(cfg), cfg).suites
    assert all(suites[s]["total"] == 40 for s in cfg.suites)
    assert suites["tool_call"]["accuracy"] >= 65.0, suites
    assert suites["tool_no_call"]["accuracy"] >= 85.0, suites
    assert suites["tool_result"]["accuracy"] >= 65.0, suites
