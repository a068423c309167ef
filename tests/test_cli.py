"""The CLI turns bad input into a one-line error and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pesc_serve", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model", "/no/such/model"], "not found"),
        (["--model", "camelidae", "--max-num-seqs", "0"], "--max-num-seqs must be a positive integer"),
        (["--model", "camelidae", "--port", "70000"], "--port must be in 0..65535"),
        (["--model", "camelidae", "--chat-template", "/no/such/file.jinja"], "--chat-template"),
        (["--model", "someone/not-cached-model"], "not in the local Hugging Face cache"),
    ],
)
def test_bad_flags_give_clear_errors(args, expected):
    p = _run(*args)
    assert p.returncode == 2
    assert expected in p.stderr
    assert "Traceback" not in p.stderr


def test_unknown_choice_is_rejected_by_argparse():
    p = _run("--quantization", "int3")
    assert p.returncode == 2 and "invalid choice" in p.stderr
