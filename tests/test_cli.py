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


def test_kv_cache_dtype_flag_and_its_auto_rule():
    import torch

    from pesc_serve.__main__ import configs_from_args, parse_args
    from pesc_serve.config import EngineConfig, resolve_kv_cache_dtype

    _, engine_cfg, _ = configs_from_args(parse_args(["--model", "camelidae"]))
    assert engine_cfg.kv_cache_dtype == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kv_cache_dtype("auto", torch.float32, cpu) == torch.float16  # half the bytes attention reads
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_kv_cache_dtype("auto", torch.float16, cuda) == torch.float16
    assert resolve_kv_cache_dtype("model", torch.float32, cpu) == torch.float32
    assert resolve_kv_cache_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp8")
    p = _run("--kv-cache-dtype", "int4")
    assert p.returncode == 2 and "invalid choice" in p.stderr
