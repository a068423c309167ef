"""benchmarks/bench_ray.py's CPU accounting: where the CPU went while the Serve hop was measured."""

from __future__ import annotations

import subprocess
import sys
import pytest

from benchmarks.bench_ray import process_cpu_seconds

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_process_is_counted_under_the_kind_its_command_line_names():
    """A process whose command line names the direct server counts as the engine, not as "other"."""
    spin = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
            "import sys; sys.stdout.write('done\\n'); sys.stdout.flush(); time.sleep(60)")
    # argv carries the marker the accounting looks for; the script ignores its arguments.
    proc = subprocess.Popen([sys.executable, "-c", spin, "pesc_serve --model", "x"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "done"  # it has used its 0.3 CPU seconds
        used = process_cpu_seconds()
        assert used.get("engine (direct)", 0.0) >= 0.25, used
        assert "other" in used  # this test's own process, at least
    finally:
        proc.kill()
        proc.wait()

