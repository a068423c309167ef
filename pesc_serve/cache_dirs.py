"""Where pesc-serve keeps what it derives once and reuses across starts.

Converted GGUF tokenizers and the compiled CPU kernels live under ``$PESC_SERVE_CACHE``
(default ``$XDG_CACHE_HOME/pesc_serve``, i.e. ``~/.cache/pesc_serve``); a container can
point it at a volume so a restart skips the work.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The directory for one kind of cached file (not created here)."""
    root = os.environ.get("PESC_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pesc_serve"
    )
    return Path(root) / kind
