"""The decode step-time summary reads what it claims: rate, percentiles, growth over the run."""

from __future__ import annotations

import pytest

from benchmarks.decode_step_times import summarise


def test_summary_of_steps_that_slow_down_as_the_context_grows():
    times = [0.005 + 0.001 * (i // 20) for i in range(100)]  # five blocks: 5, 6, 7, 8, 9 ms
    row = summarise(times)
    assert row["fifths_ms"] == [5.0, 6.0, 7.0, 8.0, 9.0]
    assert row["tok_s"] == pytest.approx(100 / sum(times), abs=0.1)
    assert row["median_ms"] == 7.0 and row["p10_ms"] == 5.0 and row["p90_ms"] == 9.0 and row["max_ms"] == 9.0
