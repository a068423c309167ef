"""Resolving --model: aliases, directories, GGUF files and hub ids from the local cache."""

from __future__ import annotations

import shutil

import pytest

from pesc_serve.registry import resolve_model


def test_aliases_resolve():
    assert resolve_model("smollm2").kind == "gguf"
    camelidae = resolve_model("camelidae")
    assert camelidae.kind == "delta" and camelidae.base is not None and camelidae.base.kind == "gguf"
    assert camelidae.config["num_experts"] == 8 and camelidae.config["topk"] == 2


def test_hub_id_resolves_from_the_local_cache(tiny_checkpoint_factory, tmp_path, monkeypatch):
    """A hub id finds its snapshot in the Hugging Face cache layout, with no network."""
    snapshot = tmp_path / "models--someone--Tiny-Camelidae" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_checkpoint_factory("camelidae"), snapshot)
    (tmp_path / "models--someone--Tiny-Camelidae" / "refs").mkdir()
    (tmp_path / "models--someone--Tiny-Camelidae" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    source = resolve_model("someone/Tiny-Camelidae")
    assert source.kind == "hf_dir" and source.path.resolve() == snapshot.resolve()
    assert source.config["model_type"] == "camelidae"


def test_unknown_hub_id_offline_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="huggingface-cli download hywu/Camelidae-8x7B"):
        resolve_model("hywu/Camelidae-8x7B")


def test_gguf_file_and_bad_paths(tmp_path):
    gguf = resolve_model("smollm2").path
    assert resolve_model(str(gguf)).kind == "gguf"
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="directory"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="not found"):
        resolve_model("no-such-model-anywhere")
