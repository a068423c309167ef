"""Load the tokenizer (and its chat template) that belongs to a model source.

A GGUF carries its tokenizer; converting it takes seconds, so the converted tokenizer is
cached on disk (keyed by the file's path, size and mtime) and reloaded quickly next time.
"""

from __future__ import annotations

import hashlib

from pesc_serve.cache_dirs import cache_dir
from pesc_serve.registry import ModelSource


def load_tokenizer(source: ModelSource):
    """A Hugging Face tokenizer for ``source`` (never with remote code)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    src = source.tokenizer_source
    if src.kind != "gguf":
        # transformers warns that it does not know model types such as "camelidae": we only
        # want the tokenizer, so that warning is noise.
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=False)
        except Exception as exc:
            raise ValueError(f"{src.path}: could not load a tokenizer ({type(exc).__name__}: {exc})") from None
        finally:
            hf_logging.set_verbosity(level)
    stat = src.path.stat()
    key = hashlib.sha256(f"{src.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir("tokenizers") / key
    if (cached / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:
            pass  # a broken cache entry: rebuild it below
    tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    try:
        tok.save_pretrained(str(cached))
    except OSError:
        pass  # a read-only cache is only slower
    return tok
