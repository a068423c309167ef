"""Find and read the weight files of a Hugging Face style directory, one tensor at a time.

Safe formats only: safetensors, and pickled ``pytorch_model*.bin`` shards read with
``torch.load(weights_only=True)`` (Camelidae ships those).  Every failure names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")


def weight_files(directory: Path) -> list[Path]:
    """The shard files of a checkpoint directory, from its index when there is one."""
    for index_name in _INDEX_FILES:
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: not a valid weight index ({exc})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise ValueError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
            return [directory / s for s in shards]
    for name in _SINGLE_FILES:
        if (directory / name).is_file():
            return [directory / name]
    shards = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if shards:
        return shards
    raise ValueError(
        f"{directory}: no weights found (expected model.safetensors[.index.json] or pytorch_model[.bin.index.json])"
    )


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one safetensors or .bin file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types on corrupt headers
            raise ValueError(f"{path}: corrupt or unreadable safetensors file ({exc})") from None
        return
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: {_bin_error(exc)}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is not a tensor")
        yield name, tensor


def _bin_error(exc: Exception) -> str:
    """A user-facing reason; torch's own text suggests weights_only=False, which we never do."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text:
        return "not a plain PyTorch weights file (it contains objects other than tensors; refusing to unpickle them)"
    return "not a PyTorch weights file (corrupt, truncated or another format)"

