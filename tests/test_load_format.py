"""``--load-format dummy``: benchmark a checkpoint's shapes from its config.json alone."""

from __future__ import annotations

import pytest
import torch

from pesc_serve.config import LoadConfig
from pesc_serve.models.loader import load_model
from pesc_serve.registry import resolve_model


def test_dummy_load_format_needs_only_config(tiny_checkpoint_factory, tmp_path):
    import shutil

    src = tiny_checkpoint_factory("sparsetral")
    shutil.copy(src / "config.json", tmp_path / "config.json")  # no weight files at all
    lm = load_model(resolve_model(str(tmp_path)), LoadConfig(model=str(tmp_path), dtype="float32", load_format="dummy"))
    layer = lm.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    experts = layer.mlp.experts[0]
    assert experts.down.abs().sum() > 0 and torch.isfinite(experts.up).all()
    with pytest.raises(ValueError, match="no weights found"):
        load_model(resolve_model(str(tmp_path)), LoadConfig(model=str(tmp_path), dtype="float32"))
