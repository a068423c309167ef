"""Run untrusted Python (model-written code) in a separate, limited process.

A fresh ``python -I`` in an empty temporary directory, with CPU-time, memory, file-size and
process-count limits and a wall-clock timeout.  This stops runaway loops and accidental
damage from generated code; it is not a security boundary against hostile code.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_LIMIT_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class RunResult:
    ok: bool
    stdout: str
    stderr: str


def _limits(cpu_seconds: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))


def run_python(code: str, timeout_s: float = 5.0, max_output: int = 10000) -> RunResult:
    """Exit status 0 within the limits means ``ok``; stdout/stderr are captured (truncated)."""
    with tempfile.TemporaryDirectory(prefix="pesc-sandbox-") as cwd:
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": cwd}
        script = os.path.join(cwd, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        try:
            proc = subprocess.run(
                [sys.executable, "-I", script],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                preexec_fn=lambda: _limits(int(timeout_s) + 1),
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return RunResult(False, "", "timeout")
    return RunResult(proc.returncode == 0, proc.stdout[:max_output], proc.stderr[-2000:])


def run_many(snippets: list[str], timeout_s: float = 30.0) -> list[str]:
    """stdout of many trusted snippets in ONE process (fast data building); raises on failure.

    Each snippet runs in a fresh namespace; outputs are separated by a marker line.
    """
    marker = "\n--pesc-sandbox-marker--\n"
    program = ["import contextlib, io, sys"]
    for i, code in enumerate(snippets):
        program.append(
            f"_buf = io.StringIO()\nwith contextlib.redirect_stdout(_buf):\n    exec({code!r}, {{}})\n"
            f"sys.stdout.write(_buf.getvalue() + {marker!r})"
        )
    result = run_python("\n".join(program), timeout_s, max_output=1 << 24)
    if not result.ok:
        raise RuntimeError(f"snippets failed to run: {result.stderr}")
    parts = result.stdout.split(marker)
    if len(parts) != len(snippets) + 1:
        raise RuntimeError("snippet outputs could not be separated")
    return parts[:-1]
