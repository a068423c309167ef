"""The benchmark's Hugging Face peer computes the same model as pesc-serve (LoRA delta included),
so its speed is compared on equal work."""

from __future__ import annotations

import pytest
import torch

from benchmarks.peers.hf_reference_server import load_reference
from pesc_serve.config import LoadConfig
from pesc_serve.models.loader import load_model
from pesc_serve.registry import resolve_model
from training.trainable import TrainableConfig, TrainableModel

pytestmark = pytest.mark.slow


def test_hf_reference_matches_bundled_camelidae():
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 2]
    hf, _ = load_reference("camelidae", torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    lm = load_model(resolve_model("camelidae"), LoadConfig(model="camelidae", dtype="float32", device="cpu", quantization="none"))
    ours_model = TrainableModel(lm.model, TrainableConfig(lora=None, adapter_dropout=0.0)).eval()
    with torch.no_grad():
        ours = ours_model.compute_logits(ours_model(torch.tensor([ids])).hidden[0])
    assert (ref - ours).abs().max().item() < 1e-3
