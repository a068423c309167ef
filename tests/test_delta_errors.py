"""Every bad delta is refused with a message naming the file and the problem: at start-up
(``--adapters``, a CLI error) and over the API (a 400, tested in test_adapters_api.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pesc_serve.__main__ import main
from pesc_serve.config import LoadConfig
from pesc_serve.deltas.delta import find_delta
from pesc_serve.models.loader import load_delta, load_model
from pesc_serve.registry import resolve_model
from tests.fixtures.tiny_checkpoints import make_checkpoint
from tests.fixtures.tiny_deltas import make_peft_lora, make_pesc_delta


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_deltas")
    path = make_checkpoint("llama", root / "base", seed=5, tie_word_embeddings=False)
    lm = load_model(resolve_model(str(path)), LoadConfig(model=str(path), dtype="float32", device="cpu"))
    return path, lm


def _good(tmp_path: Path, base_dir: Path, **kw) -> Path:
    return make_pesc_delta(tmp_path / "delta", base_dir, seed=1, **kw)


def _rewrite(delta: Path, edit) -> None:
    file = delta / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def _error(lm, path: Path) -> str:
    with pytest.raises(ValueError) as exc:
        load_delta(lm, find_delta("bad", path))
    return str(exc.value)


def test_a_good_delta_loads(base, tmp_path):
    base_dir, lm = base
    delta = load_delta(lm, find_delta("good", _good(tmp_path, base_dir)))
    assert delta.num_experts == 4 and delta.topk == 2 and len(delta.lora) == 4 * lm.config.num_layers
    assert 0 < delta.file_bytes and delta.nbytes > 0


def test_missing_path(base, tmp_path):
    assert "no such file or directory" in _error(base[1], tmp_path / "nowhere")


def test_a_file_instead_of_a_directory(base, tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    assert "a delta is a directory" in _error(base[1], tmp_path / "x.safetensors")


def test_a_directory_that_is_no_delta(base, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no adapter_config.json" in _error(base[1], tmp_path / "empty")
    # a full model is not a delta either
    assert "not a PESC delta" in _error(base[1], base[0])


def test_a_delta_for_another_base(base, tmp_path):
    base_dir, lm = base
    wide = make_checkpoint("llama", tmp_path / "wide", seed=2, hidden_size=96, tie_word_embeddings=False)
    msg = _error(lm, make_pesc_delta(tmp_path / "for_wide", wide))
    assert "for_wide/adapter_model.safetensors" in msg and "96]" in msg and "(hidden 64, 2 layers)" in msg
    deep = make_checkpoint("llama", tmp_path / "deep", seed=2, num_hidden_layers=3, tie_word_embeddings=False)
    msg = _error(lm, make_pesc_delta(tmp_path / "for_deep", deep))
    assert "unexpected tensor 'model.layers.2." in msg and "2 layers" in msg
    msg = _error(lm, make_peft_lora(tmp_path / "peft_wide", wide))
    assert "peft_wide/adapter_model.safetensors" in msg and "do not fit" in msg and "another base" in msg
    declared = _good(tmp_path, base_dir, extra_config={"vocab_size": 32000})
    assert "vocab_size is 32000" in _error(lm, declared) and "another base" in _error(lm, declared)


def test_mismatched_expert_counts(base, tmp_path):
    base_dir, lm = base
    fewer = _good(tmp_path, base_dir, extra_config={"num_experts": 6})  # tensors for 4
    msg = _error(lm, fewer)
    assert "router.weight' has shape [4, 64], expected [6, 64]" in msg and "6 experts" in msg
    _rewrite(fewer, lambda t: [t.__setitem__(k, torch.zeros(6, 64, dtype=v.dtype)) for k, v in list(t.items())
                               if k.endswith("router.weight")])
    assert "missing tensor(s) model.layers.0.mlp.moe_adapter.experts.4.adapter_down.weight" in _error(lm, fewer)
    shutil.rmtree(fewer)
    more = _good(tmp_path, base_dir, extra_config={"num_experts": 3})  # tensors for 4
    msg = _error(lm, more)
    assert "unexpected tensor" in msg and "experts.expert_3" in msg
    shutil.rmtree(more)
    bad_topk = _good(tmp_path, base_dir, extra_config={"topk": 9})
    assert "topk must be in [1, num_experts=4]" in _error(lm, bad_topk)


def test_mis_shaped_and_missing_tensors(base, tmp_path):
    base_dir, lm = base
    delta = _good(tmp_path, base_dir)
    _rewrite(delta, lambda t: t.pop("model.layers.1.mlp.moe_adapter.router.weight"))
    assert "missing tensor(s) model.layers.1.mlp.moe_adapter.router.weight" in _error(lm, delta)
    shutil.rmtree(delta)
    delta = _good(tmp_path, base_dir)
    key = "model.layers.0.mlp.moe_adapter.experts.expert_2.adapter_up.weight"
    _rewrite(delta, lambda t: t.__setitem__(key, torch.zeros(64, 5)))
    assert f"tensor {key!r} has shape [64, 5], expected [64, 8]" in _error(lm, delta)
    shutil.rmtree(delta)
    delta = _good(tmp_path, base_dir)
    _rewrite(delta, lambda t: t.pop("model.layers.0.self_attn.q_proj.lora_B.weight"))
    assert "has only lora_A" in _error(lm, delta)
    shutil.rmtree(delta)
    delta = _good(tmp_path, base_dir)
    _rewrite(delta, lambda t: t.update({"model.embed_tokens.lora_A.weight": torch.zeros(4, 64),
                                        "model.embed_tokens.lora_B.weight": torch.zeros(384, 4)}))
    msg = _error(lm, delta)
    assert "model.embed_tokens.weight" in msg and "not supported" in msg


def test_corrupt_files(base, tmp_path):
    base_dir, lm = base
    delta = _good(tmp_path, base_dir)
    (delta / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    assert "corrupt or unreadable safetensors file" in _error(lm, delta)
    (delta / "config.json").write_text("{not json")
    assert "config.json: invalid JSON" in _error(lm, delta)


def test_pickled_weights_are_not_loaded(base, tmp_path):
    base_dir, lm = base
    delta = _good(tmp_path, base_dir)
    (delta / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, delta / "adapter_model.bin")
    msg = _error(lm, delta)
    assert "adapter_model.bin: pickled weights are not loaded" in msg


def test_unsupported_peft_variants(base, tmp_path):
    base_dir, lm = base
    peft = make_peft_lora(tmp_path / "peft", base_dir)
    cfg_file = peft / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    for key, value, words in (("use_dora", True, "DoRA"), ("peft_type", "IA3", "peft_type"),
                              ("modules_to_save", ["lm_head"], "modules_to_save"), ("r", 0, "'r' must be positive")):
        cfg_file.write_text(json.dumps(dict(cfg, **{key: value})))
        assert words in _error(lm, peft), key


def test_the_cli_names_the_bad_delta_at_start_up(base, tmp_path, capsys):
    base_dir, _ = base
    bad = _good(tmp_path, base_dir)
    (bad / "adapter_model.safetensors").write_bytes(b"junk")
    rc = main(["--model", str(base_dir), "--adapters", f"ok={make_peft_lora(tmp_path / 'ok', base_dir)}",
               f"bad={bad}", "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad / "adapter_model.safetensors") in err and "corrupt" in err
    assert main(["--model", str(base_dir), "--adapters", "a=x", "a=y"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["--model", str(base_dir), "--adapters", f"{base_dir.name}={bad}"]) == 2
    assert "already the name of a served model" in capsys.readouterr().err
