"""A delta's LoRA is merged only into weights that stay unquantized; a quantized base keeps the
checkpoint's values and runs the LoRA beside it, in the PyTorch path and in the C++ step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pesc_serve.config import LoadConfig
from pesc_serve.layers.lora import LoRALinear
from pesc_serve.models.cpu_decode import build_decode_model, install_packed_kernels, load_extension
from pesc_serve.models.loader import load_model
from pesc_serve.registry import resolve_model
from tests.fixtures.tiny_checkpoints import make_checkpoint
from tests.test_cpu_decode import _compare_decode_steps
from training.craft import craft
from training.export import write_delta
from training.trainable import TrainableConfig, TrainableModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA_MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.ffn.gate_up_proj", "mlp.ffn.down_proj")


def _load(path: Path, quantization: str):
    return load_model(resolve_model(str(path)), LoadConfig(model=str(path), dtype="float32", device="cpu",
                                                           quantization=quantization))


@pytest.fixture(scope="module")
def delta(tmp_path_factory) -> tuple[Path, Path]:
    """(crafted base, trained-like delta): random routers, adapters and small LoRA updates, the
    size of a real rank-4 LoRA's (below one int4 step of the weights)."""
    root = tmp_path_factory.mktemp("lora")
    dense = make_checkpoint("llama", root / "dense", seed=3, tie_word_embeddings=False, max_position_embeddings=1024)
    base = craft(str(dense), root / "crafted", 4, 2, 8, 0.25, seed=1, dtype=torch.float32)
    tm = TrainableModel(_load(base, "none").model, TrainableConfig(seed=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tm.trainable_parameters():
            scale = 0.05 if "lora" in name else 0.1
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(torch.bfloat16).float())
    out = write_delta(tm, resolve_model(str(base)), str(base), root / "delta", {"status": "trained", "note": "test"})
    return base, out


def test_unquantized_weights_get_the_lora_merged(delta):
    lm = _load(delta[1], "none")
    assert not any(isinstance(m, LoRALinear) for m in lm.model.modules())


@pytest.mark.parametrize("quantization", ["int8", "auto"])
def test_quantized_weights_keep_the_checkpoint_and_run_the_lora_beside(delta, quantization):
    base_dir, delta_dir = delta
    served, base = _load(delta_dir, quantization), _load(base_dir, quantization)
    merged, plain = _load(delta_dir, "none"), _load(base_dir, "none")
    x = torch.randn(5, served.config.hidden_size, generator=torch.Generator().manual_seed(1))
    x_ffn = torch.randn(5, served.config.intermediate_size, generator=torch.Generator().manual_seed(2))
    quantized = [name for name in LORA_MODULES if served.quantization.method_for(name) != "none"]
    assert quantized, "the plan quantizes nothing"
    for layer in range(served.config.num_layers):
        for name in quantized:
            full = f"layers.{layer}.{name}"
            module = served.model.get_submodule(full)
            assert isinstance(module, LoRALinear), full
            # the base weights are exactly the base checkpoint's, quantized the same way
            base_module = base.model.get_submodule(full)
            for key, value in base_module.state_dict().items():
                assert torch.equal(module.base.state_dict()[key], value), (full, key)
            # and the update beside them is the one the merge would have added, unquantized
            inp = x_ffn if name.endswith("down_proj") else x
            with torch.no_grad():
                update = module(inp) - module.base(inp)
                w_delta = merged.model.get_submodule(full).weight - plain.model.get_submodule(full).weight
            assert torch.allclose(update, inp @ w_delta.t(), atol=1e-5), full


def test_the_cpp_step_runs_the_lora_too(delta):
    ext = load_extension()
    path = str(delta[1])
    _compare_decode_steps(ext, path, "auto", [13, 5, 9], grouped=True)  # C++ == PyTorch, LoRA included
    # and the LoRA matters to the C++ step's output: without it the logits move far more
    lm = _load(delta[1], "auto")
    install_packed_kernels(lm.model, ext)
    tokens, positions = torch.tensor([7]), torch.tensor([0])
    kv = torch.zeros(lm.config.num_layers, 2, 8, lm.config.num_kv_heads, lm.config.head_dim)
    with_lora, _ = build_decode_model(lm.model, ext).forward(tokens, positions, kv.clone(), torch.tensor([0]),
                                                             torch.tensor([[0, 1]]), 4)
    for m in lm.model.modules():
        if isinstance(m, LoRALinear):
            m.lora_b.zero_()
    without, _ = build_decode_model(lm.model, ext).forward(tokens, positions, kv.clone(), torch.tensor([0]),
                                                           torch.tensor([[0, 1]]), 4)
    assert float((with_lora - without).norm() / without.norm()) > 0.05


def test_the_lora_update_of_a_row_does_not_depend_on_the_batch():
    """ATen's matmul rounds a row differently at M=1 and M=9 (its blocking changes); through the
    int8 activation rounding and the router that changed whole seeded texts on the real model.
    The row-by-row kernel, which both paths run, gives every row the same numbers in any batch."""
    ext = load_extension()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 576, generator=g)
    a, b = torch.randn(12, 576, generator=g) * 0.05, torch.randn(1728, 12, generator=g) * 0.05
    base = torch.nn.Linear(576, 1728, bias=False)
    torch.nn.init.zeros_(base.weight)  # an exact zero in any batch: only the update is compared
    module = LoRALinear(base, a, b)
    install_packed_kernels(module, ext)
    assert module.kernel is not None
    with torch.no_grad():
        alone, batched = module(x[:1]), module(x)
    assert torch.equal(alone[0], batched[0])
    assert torch.allclose(batched, (x @ a.t()) @ b.t(), atol=1e-5)


def test_the_cpp_step_with_a_delta_gives_a_row_the_same_logits_in_any_batch(delta):
    ext = load_extension()
    lm = _load(delta[1], "auto")
    install_packed_kernels(lm.model, ext)
    dm = build_decode_model(lm.model, ext)
    cfg = lm.config
    kv = (torch.randn(cfg.num_layers, 2, 8 * 16 * 20, cfg.num_kv_heads, cfg.head_dim,
                      generator=torch.Generator().manual_seed(3))).to(torch.float16)

    def step(rows: int, position: int) -> torch.Tensor:
        """Row 0 decodes at ``position`` over a random context; the other rows are neighbours."""
        block, width = 16, position // 16 + 1
        tokens = torch.tensor([7] + [11] * (rows - 1))
        positions = torch.tensor([position] + [3] * (rows - 1))
        tables = torch.arange(rows * width).view(rows, width)
        slots = tables[torch.arange(rows), positions // block] * block + positions % block
        logits, _ = dm.forward(tokens, positions, kv.clone(), slots, tables, block)
        return logits[0]

    # a short context, and one long enough to be split into chunks merged by log-sum-exp
    for position in (0, 300):
        alone = step(1, position)
        assert torch.equal(alone, step(3, position)) and torch.equal(alone, step(8, position)), position
