"""Compile the C++ extension (``pesc_serve/csrc/``) on first use and cache it.

The build uses ``-march=native``, so a cache is kept per CPU (and per Python and torch
version, builds that cannot load into each other), and per digest of the sources: an edited
header must not load an extension built from the old one.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from pesc_serve.cache_dirs import cache_dir
from pesc_serve.kernels.cpu_features import cpu_tag

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCE = CSRC / "extension.cpp"
STALE_BUILD_LOCK_S = 600.0  # a build takes about a minute on 2 cores


def sources_digest() -> str:
    """A short digest of every C++ file of the extension (the one source and its headers)."""
    h = hashlib.sha1()
    for path in sorted(CSRC.glob("*.[ch]*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def build_directory() -> Path:
    """Where the extension is compiled and cached (see the module's docstring)."""
    tag = (f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-cpu{cpu_tag()}"
           f"-src{sources_digest()}")
    return cache_dir("kernels") / tag


def clear_stale_build_lock(directory: Path, max_age_s: float = STALE_BUILD_LOCK_S) -> bool:
    """Remove a build lock older than any build takes; True if one was removed.

    torch's builder waits, forever, while its lock file exists; a build killed midway
    (a server stopped during its first start) leaves one behind.
    """
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    logger.warning("removing %s, left %.0f s ago by an interrupted kernel build", lock, age)
    lock.unlink(missing_ok=True)
    return True


def load_extension() -> ModuleType:
    """Compile (first time, ~1 min on 2 cores) or load the cached extension."""
    from torch.utils.cpp_extension import load

    start = time.monotonic()
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    clear_stale_build_lock(directory)
    # Reassociation lets GCC vectorise the dot-product loops; no finite-math assumptions.
    # -fopenmp: at::parallel_for is a header template that runs serially without it (the
    # OpenMP runtime itself is the one torch has already loaded).
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
             "-fno-trapping-math"]
    ext = load(name="pesc_cpu_kernels", sources=[str(SOURCE)], extra_cflags=flags, build_directory=str(directory),
               extra_include_paths=[str(CSRC)], verbose=False)
    elapsed = time.monotonic() - start
    if elapsed > 5:
        logger.info("compiled the CPU decode kernels in %.0f s (cached for later starts)", elapsed)
    return ext
