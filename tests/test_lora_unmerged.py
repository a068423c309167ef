"""A delta's LoRA is never merged: the base keeps the checkpoint's values (quantized or not) and
the LoRA runs beside it, in the PyTorch path and in the C++ step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pesc_serve.config import LoadConfig
from safetensors.torch import load_file

from pesc_serve.deltas.table import DeltaTable
from pesc_serve.layers.lora import LoRAPart, LoRAWeights, SlotLoRA
from pesc_serve.kernels.build import load_extension
from pesc_serve.kernels.cpu_kernels import CpuKernels, build_decode_model, install_packed_kernels
from pesc_serve.models.decoder import lora_site
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


def _installed(path: Path, quantization: str, ext=None):
    """The model with its delta in slot 0, as the engine sets it up (and the C++ step, with ``ext``)."""
    lm = _load(path, quantization)
    dm = None
    if ext is not None:
        install_packed_kernels(lm.model, ext)
        dm = build_decode_model(lm.model, ext)
    table = DeltaTable(lm.model, CpuKernels(ext, lm.model, dm) if ext is not None else None, 1)
    if lm.delta is not None:
        table.install(0, lm.delta)
    return lm, dm


def _file_updates(delta_dir: Path, scaling: float) -> dict[str, torch.Tensor]:
    """scaling * B @ A per fused module, straight from the delta file: the update a merge adds."""
    tensors = load_file(str(delta_dir / "adapter_model.safetensors"))
    fused = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1), "v_proj": ("self_attn.qkv_proj", 2),
             "o_proj": ("self_attn.o_proj", 0), "gate_proj": ("mlp.ffn.gate_up_proj", 0),
             "up_proj": ("mlp.ffn.gate_up_proj", 1), "down_proj": ("mlp.ffn.down_proj", 0)}
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, a in tensors.items():
        if not name.endswith("lora_A.weight"):
            continue
        b = tensors[name.replace("lora_A", "lora_B")]
        layer, leaf = name.split(".")[2], name.split(".")[-3]
        module, order = fused[leaf]
        parts.setdefault(f"layers.{layer}.{module}", []).append((order, scaling * b.float() @ a.float()))
    return {m: torch.cat([w for _, w in sorted(p, key=lambda t: t[0])]) for m, p in parts.items()}


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_the_base_keeps_its_checkpoint_and_the_lora_runs_beside_it(delta, quantization):
    """Never merged, whatever the quantization: the base's weights are exactly the base
    checkpoint's (quantized the same way) and the update beside them is the file's B A."""
    base_dir, delta_dir = delta
    served, _ = _installed(delta_dir, quantization)
    base = _load(base_dir, quantization)
    scaling = 8.0 / 4  # lora_alpha / rank of training's defaults
    updates = _file_updates(delta_dir, scaling)
    assert len(updates) == served.config.num_layers * len(LORA_MODULES)
    x = torch.randn(5, served.config.hidden_size, generator=torch.Generator().manual_seed(1))
    x_ffn = torch.randn(5, served.config.intermediate_size, generator=torch.Generator().manual_seed(2))
    for layer in range(served.config.num_layers):
        for name in LORA_MODULES:
            full = f"layers.{layer}.{name}"
            module, base_module = served.model.get_submodule(full), base.model.get_submodule(full)
            assert type(module) is type(base_module)
            for key, value in base_module.state_dict().items():
                assert torch.equal(module.state_dict()[key], value), (full, key)
            inp = x_ffn if name.endswith("down_proj") else x
            with torch.no_grad():
                update = lora_site(served.model, full)(torch.zeros(5, updates[full].shape[0]), inp)
            assert torch.allclose(update, inp @ updates[full].t(), atol=1e-5), full


def test_the_cpp_step_runs_the_lora_too(delta):
    ext = load_extension()
    path = str(delta[1])
    _compare_decode_steps(ext, path, "int4", [13, 5, 9], grouped=True)  # C++ == PyTorch, LoRA included
    # and the LoRA matters to the C++ step's output: without it the logits move far more
    tokens, positions = torch.tensor([7]), torch.tensor([0])
    logits = []
    for keep_lora in (True, False):
        lm = _load(delta[1], "int4")
        install_packed_kernels(lm.model, ext)
        dm = build_decode_model(lm.model, ext)
        delta_obj = lm.delta if keep_lora else dataclasses.replace(lm.delta, lora={})
        DeltaTable(lm.model, CpuKernels(ext, lm.model, dm), 1).install(0, delta_obj)
        kv = torch.zeros(lm.config.num_layers, 2, 8, lm.config.num_kv_heads, lm.config.head_dim)
        out, _ = dm.forward(tokens, positions, kv, torch.tensor([0]), torch.tensor([[0, 1]]), 4, torch.tensor([0]))
        logits.append(out)
    assert float((logits[0] - logits[1]).norm() / logits[1].norm()) > 0.05


def _fused_qkv_lora(dtype: torch.dtype) -> tuple[LoRAWeights, torch.Tensor]:
    """A q/k/v LoRA of three rank-4 parts on a fused [1728, 576] layer, and its update matrix."""
    g = torch.Generator().manual_seed(0)
    parts = [LoRAPart(torch.randn(4, 576, generator=g) * 0.05, torch.randn(576, 4, generator=g) * 0.05,
                      slice(576 * i, 576 * (i + 1))) for i in range(3)]
    parts = [LoRAPart(p.a.to(dtype), p.b.to(dtype), p.rows) for p in parts]
    full = torch.cat([1.5 * p.b.float() @ p.a.float() for p in parts])  # [1728, 576]
    return LoRAWeights(parts, 1.5, dtype, torch.device("cpu")), full


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lora_update_of_a_row_does_not_depend_on_the_batch(dtype):
    """ATen's matmul rounds a row differently at M=1 and M=9 (its blocking changes); through the
    int8 activation rounding and the router that changed whole seeded texts on the real model.
    The row-by-row kernel, which both paths run, gives every row the same numbers in any batch,
    also when enough rows split the columns between threads."""
    ext = load_extension()
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(1))
    weights, full = _fused_qkv_lora(dtype)
    module = SlotLoRA()
    module.by_slot[0] = weights
    install_packed_kernels(module, ext)
    assert module.kernel is not None
    with torch.no_grad():  # a zero base output: only the update is compared
        alone = module(torch.zeros(1, 1728), x[:1])
        batched = [module(torch.zeros(n, 1728), x[:n]) for n in (9, 40)]
    assert all(torch.equal(alone[0], b[0]) for b in batched)
    assert torch.allclose(batched[-1], x @ full.t(), atol=1e-5)
    assert torch.allclose(batched[-1], weights.update(x, 1728), atol=1e-5)  # the matmul path, where no kernel runs


def test_a_bf16_lora_is_held_as_the_file_holds_it(delta):
    """No fused block-diagonal zeros and no float32 copies: the resident LoRA takes the bytes of
    the file's LoRA tensors (the shipped `camel` delta took 2.9x its file before)."""
    _, delta_dir = delta
    lm = _load(delta_dir, "int4")
    tensors = load_file(str(delta_dir / "adapter_model.safetensors"))
    lora_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if ".lora_" in n)
    assert {t.dtype for n, t in tensors.items() if ".lora_" in n} == {torch.bfloat16}
    assert sum(w.nbytes for w in lm.delta.lora.values()) == lora_bytes


def test_a_resident_delta_keeps_no_view_of_its_file(delta):
    """The delta's tensors own their memory: a view into safetensors' mapping of the file (a bf16
    LoRA A needs no conversion, so it would be kept as read) kept every page of the file resident
    beside the packed copies (camelidae: 82 MiB per delta instead of 46)."""
    import gc

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    _, delta_dir = delta
    weights = str((delta_dir / "adapter_model.safetensors").resolve())
    lm = _load(delta_dir, "int4")
    gc.collect()
    assert lm.delta is not None and lm.delta.lora
    assert weights not in maps.read_text()


def test_the_cpp_step_with_a_delta_gives_a_row_the_same_logits_in_any_batch(delta):
    ext = load_extension()
    lm, dm = _installed(delta[1], "int4", ext)
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
        logits, _ = dm.forward(tokens, positions, kv.clone(), slots, tables, block, torch.zeros(rows, dtype=torch.long))
        return logits[0]

    # a short context, and one long enough to be split into chunks merged by log-sum-exp
    for position in (0, 300):
        alone = step(1, position)
        assert torch.equal(alone, step(3, position)) and torch.equal(alone, step(8, position)), position
