"""Memory settings for a serving process: the C allocator and Python's cyclic GC.

Keep the C allocator from returning big tensor buffers to the kernel between steps.

Why: a decode step allocates and frees a few multi-MiB temporaries (logits, probabilities,
their cumulative sums).  glibc serves blocks that large with fresh ``mmap`` pages and
unmaps them on free, so every step pays thousands of page faults: measured 60 -> 67 ms
per 16-row step on a 2-core CPU, with the sampler's four vocabulary-wide ops taking 3-6 ms
each instead of 0.2-0.5 ms.  Raising the mmap and trim thresholds keeps those blocks in
the heap for reuse (what tcmalloc or jemalloc, often preloaded under vLLM, do anyway).
Tensors above the mmap threshold (the KV cache, weights) are still mapped on their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 64 << 20
TRIM_THRESHOLD_BYTES = 256 << 20
TOP_PAD_BYTES = 16 << 20


def keep_freed_buffers() -> bool:
    """Tune glibc malloc for a serving process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
    if not ok:
        logger.debug("mallopt refused the allocator settings")
    return ok


def freeze_startup_objects() -> int:
    """Move every object alive now (the model's modules, the tokenizer, the app) out of the
    cyclic GC's reach; returns how many.

    Why: they live as long as the process, yet each full collection, triggered by the
    garbage that requests leave, walks all of them again on the thread that shares the
    CPU with the engine.  Called once the server is built (vLLM does the same).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
