"""Shared pytest fixtures. Keep each fixture small and documented; append new ones below."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.fixtures.tiny_checkpoints import make_checkpoint, make_crafted_pair  # noqa: E402
from tests.profiles import PROFILES  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(kind, seed=0)`` -> directory of a tiny random checkpoint, written once per session.

    Kinds: see ``tests.fixtures.tiny_checkpoints.KINDS``.  The directories are shared: tests
    must not modify them (write a private one with ``make_checkpoint(kind, tmp_path)``).
    """
    cache: dict[tuple[str, int], Path] = {}

    def factory(kind: str, seed: int = 0) -> Path:
        key = (kind, seed)
        if key not in cache:
            cache[key] = make_checkpoint(kind, tmp_path_factory.mktemp(f"tiny-{kind}-{seed}"), seed=seed)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def crafted_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dense_dir, pesc_dir): a PESC model crafted from a dense one (adapter up-projections zero)."""
    return make_crafted_pair(tmp_path_factory.mktemp("crafted"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: one thread avoids OpenMP overhead and contention on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=PROFILES)
def profile(request: pytest.FixtureRequest) -> str:
    """Run a module's engine or server under the CLI defaults and under exact float32 (tests/profiles.py)."""
    return request.param
