"""Broken or mismatched checkpoints stop the load with a ValueError that names the problem.

Every case writes a private tiny checkpoint (tests/fixtures/tiny_checkpoints.py), breaks one
thing, and checks both the exception type (ValueError, which the CLI and server turn into a
plain message, never a traceback) and that the message names the culprit.  The last tests
check the Camelidae RoPE quirk of ``ModelConfig.from_hf_config``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pesc_serve.config import LoadConfig, ModelConfig
from pesc_serve.models.loader import load_model
from pesc_serve.registry import resolve_model
from tests.fixtures.tiny_checkpoints import kind_config, make_checkpoint, random_weights, write_checkpoint


def _load(path: Path):
    return load_model(resolve_model(str(path)), LoadConfig(model=str(path), dtype="float32", device="cpu"))


def _write_modified(tmp_path: Path, kind: str, fmt: str, edit, expert_style: str = "expert_", **overrides) -> Path:
    """A checkpoint of ``kind`` whose weight dict went through ``edit(weights)`` before writing."""
    cfg = kind_config(kind)
    cfg.update(overrides)
    weights = random_weights(cfg, seed=0, expert_style=expert_style)
    edit(weights)
    return write_checkpoint(tmp_path / kind, cfg, weights, fmt)


def _raises(path: Path, *patterns: str) -> str:
    """Loading ``path`` raises ValueError whose message matches every regex in ``patterns``."""
    with pytest.raises(ValueError) as info:
        _load(path)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in error message: {message}"
    return message


def test_fixtures_load_cleanly(tmp_path):
    """Control: the unmodified fixtures load (so the failures below come from the breakage)."""
    for kind in ("camelidae", "sparsetral", "qwen2"):
        assert _load(make_checkpoint(kind, tmp_path / kind)).model is not None


# --- corrupt files -----------------------------------------------------------------------------


def test_truncated_safetensors(tmp_path):
    path = make_checkpoint("qwen2idae", tmp_path / "ckpt")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _raises(path, re.escape("model.safetensors"))


def test_truncated_safetensors_header(tmp_path):
    path = make_checkpoint("qwen2idae", tmp_path / "ckpt")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    _raises(path, re.escape("model.safetensors"))


def test_garbage_bin_shard(tmp_path):
    path = make_checkpoint("camelidae", tmp_path / "ckpt")
    shard = path / "pytorch_model-00001-of-00002.bin"
    garbage = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    shard.write_bytes(garbage.numpy().tobytes())
    _raises(path, re.escape("pytorch_model-00001-of-00002.bin"))


def test_index_names_missing_shard(tmp_path):
    path = make_checkpoint("sparsetral", tmp_path / "ckpt")
    (path / "model-00002-of-00002.safetensors").unlink()
    _raises(path, re.escape("model-00002-of-00002.safetensors"))


def test_bin_index_names_missing_shard(tmp_path):
    path = make_checkpoint("camelidae", tmp_path / "ckpt")
    (path / "pytorch_model-00002-of-00002.bin").unlink()
    _raises(path, re.escape("pytorch_model-00002-of-00002.bin"))


# --- tensors that do not fit config.json ---------------------------------------------------------


@pytest.mark.parametrize(
    "kind,fmt,name,style",
    [
        ("llama", "safetensors", "model.layers.1.mlp.up_proj.weight", "expert_"),
        ("qwen2", "bin", "model.layers.0.self_attn.k_proj.bias", "expert_"),
        ("sparsetral", "safetensors-sharded", "model.layers.0.mlp.moe_adapter.experts.2.adapter_down.weight", "plain"),
        ("camelidae", "bin-sharded", "model.layers.1.mlp.moe_adapter.experts.expert_1.adapter_up.weight", "expert_"),
        ("camelidae", "bin-sharded", "model.layers.0.mlp.moe_adapter.router.weight", "expert_"),
    ],
)
def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, kind, fmt, name, style):
    shapes = {}

    def edit(w):
        good = w[name]
        shapes["expected"] = list(good.shape)
        bad = torch.zeros(*[n + 1 for n in good.shape])
        shapes["found"] = list(bad.shape)
        w[name] = bad

    path = _write_modified(tmp_path, kind, fmt, edit, expert_style=style)
    _raises(path, re.escape(name), re.escape(str(shapes["found"])), re.escape(str(shapes["expected"])))


def test_transposed_adapter_names_both_shapes(tmp_path):
    name = "model.layers.0.mlp.moe_adapter.experts.expert_0.adapter_down.weight"

    def edit(w):
        w[name] = w[name].t().contiguous()  # [H, r] instead of [r, H]

    path = _write_modified(tmp_path, "qwen2idae", "safetensors", edit)
    _raises(path, re.escape(name), re.escape("[64, 8]"), re.escape("[8, 64]"))


@pytest.mark.parametrize(
    "kind,fmt,name,pattern",
    [
        ("mistral", "safetensors", "model.layers.1.self_attn.k_proj.weight", r"layers\.1\.self_attn\.k_proj\.weight"),
        ("qwen2idae", "safetensors", "model.layers.1.self_attn.q_proj.bias", r"layers\.1\.self_attn\.q_proj\.bias"),
        ("mistral", "safetensors", "lm_head.weight", r"lm_head\.weight"),
        (
            "camelidae",
            "bin-sharded",
            "model.layers.1.mlp.moe_adapter.experts.expert_3.adapter_up.weight",
            r"model\.layers\.1\.mlp\.moe_adapter\.experts\.(expert_)?3\.adapter_up\.weight",
        ),
        (
            "sparsetral",
            "safetensors-sharded",
            "model.layers.0.mlp.moe_adapter.router.weight",
            r"layers\.0\.mlp\.moe_adapter\.router\.weight",
        ),
    ],
)
def test_missing_tensor_is_named(tmp_path, kind, fmt, name, pattern):
    style = "plain" if kind == "sparsetral" else "expert_"
    path = _write_modified(tmp_path, kind, fmt, lambda w: w.pop(name), expert_style=style)
    _raises(path, r"missing", pattern)


@pytest.mark.parametrize(
    "kind,fmt,name",
    [
        ("llama", "safetensors", "model.layers.0.mlp.extra_proj.weight"),
        ("camelidae", "bin-sharded", "model.layers.0.mlp.moe_adapter.experts.expert_4.adapter_down.weight"),
        ("llama", "safetensors", "model.layers.2.input_layernorm.weight"),  # a third layer in a 2-layer config
        ("mistral", "safetensors", "model.layers.0.mlp.moe_adapter.router.weight"),  # experts in a dense config
    ],
)
def test_unexpected_tensor_is_named(tmp_path, kind, fmt, name):
    def edit(w):
        w[name] = torch.zeros(8, 64)

    path = _write_modified(tmp_path, kind, fmt, edit)
    _raises(path, r"unexpected", re.escape(name))


# --- config.json problems ----------------------------------------------------------------------


def test_missing_config_json(tmp_path):
    path = make_checkpoint("llama", tmp_path / "ckpt")
    (path / "config.json").unlink()
    _raises(path, r"config\.json")


def test_invalid_config_json(tmp_path):
    path = make_checkpoint("llama", tmp_path / "ckpt")
    (path / "config.json").write_text("{not json")
    _raises(path, r"config\.json")


def test_unsupported_model_type(tmp_path):
    path = make_checkpoint("llama", tmp_path / "ckpt", model_type="gpt2")
    _raises(path, r"model_type", r"gpt2")


def test_topk_larger_than_num_experts(tmp_path):
    path = make_checkpoint("camelidae", tmp_path / "ckpt", topk=5)
    _raises(path, r"topk", r"5")


def test_no_weight_files(tmp_path):
    path = make_checkpoint("llama", tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    _raises(path, r"weights")


# --- the Camelidae RoPE quirk -------------------------------------------------------------------


def _config(kind: str, tmp_path: Path, **overrides) -> ModelConfig:
    path = make_checkpoint(kind, tmp_path / kind, **overrides)
    return ModelConfig.from_hf_config(json.loads((path / "config.json").read_text()))


def test_camelidae_rope_base_is_10000(tmp_path):
    cfg = _config("camelidae", tmp_path)
    assert json.loads((tmp_path / "camelidae" / "config.json").read_text())["rope_theta"] == 500000.0
    assert cfg.rope_theta == 10000.0


def test_old_camelidae_upload_says_llama_but_keeps_quirk(tmp_path):
    """Older Camelidae uploads say model_type llama but point auto_map at modeling_camelidae."""
    cfg = _config("camelidae", tmp_path, model_type="llama")
    assert cfg.rope_theta == 10000.0


@pytest.mark.parametrize("kind,theta", [("qwen2idae", 1000000.0), ("sparsetral", 250000.0), ("llama", 10000.0)])
def test_other_models_read_rope_theta(tmp_path, kind, theta):
    assert _config(kind, tmp_path).rope_theta == theta


def test_pesc_fields_and_windows_read_from_config(tmp_path):
    cam, qwen, sparse = (_config(k, tmp_path) for k in ("camelidae", "qwen2idae", "sparsetral"))
    assert (cam.num_experts, cam.topk, cam.adapter_dim, cam.moe_scaling) == (4, 2, 8, 0.25)
    assert (sparse.num_experts, sparse.topk, sparse.adapter_dim, sparse.moe_scaling) == (6, 3, 8, 1.0)
    assert sparse.sliding_window == 6
    assert qwen.sliding_window is None  # use_sliding_window: false
    assert qwen.attention_bias and not cam.attention_bias
