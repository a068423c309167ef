"""A GGUF's Q4_1 blocks go straight into the int4 layers: bit for bit the file's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pesc_serve.config import LoadConfig
from pesc_serve.layers.quant import HybridLinear, Int4WeightOnlyLinear
from pesc_serve.models.gguf_reader import GGUFCheckpoint, Q4Blocks, q4_0_blocks, q4_1_blocks
from pesc_serve.models.loader import load_model
from pesc_serve.registry import resolve_model


def test_q4_1_blocks_unpack_as_ggml_lays_them_out():
    """One block by hand: d, m as float16, byte j holding elements j (low) and j + 16 (high)."""
    q = np.arange(32) % 16
    d, m = np.float16(0.0123), np.float16(-0.25)
    packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    raw = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), np.frombuffer(m.tobytes(), np.uint8), packed])
    blocks = q4_1_blocks(raw[None, :], 1)
    expected = torch.tensor(q, dtype=torch.float32) * float(d) + float(m)
    assert torch.equal(blocks.dequantize()[0], expected)


def test_q4_0_blocks_are_q4_1_blocks_with_min_minus_8_scale():
    """w = (q - 8) d, exactly: the int4 layer's q * scale + min with min = -8 d."""
    q = (np.arange(32) * 7) % 16
    d = np.float16(0.0371)
    packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    raw = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), packed])
    blocks = q4_0_blocks(raw[None, :], 1)
    expected = (torch.tensor(q, dtype=torch.float32) - 8) * float(d)
    assert torch.equal(blocks.dequantize()[0], expected)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    assert torch.equal(blocks.dequantize()[0], torch.from_numpy(dequantize(raw[None, :], GGMLQuantizationType.Q4_0)[0]))


@pytest.fixture(scope="module")
def smollm2():
    src = resolve_model("smollm2")
    return src, load_model(src, LoadConfig("smollm2", "auto", "cpu", "auto"))


def test_the_served_int4_weights_are_the_files(smollm2):
    src, lm = smollm2
    if lm.quantization.ffn != "int4":
        pytest.skip("the plan on this host is not int4")
    file = {name: t for name, t in GGUFCheckpoint(src.path).tensors(q4_blocks=True)}
    assert sum(isinstance(t, Q4Blocks) for t in file.values()) == 7 * lm.config.num_layers
    for i in (0, lm.config.num_layers - 1):
        layer, p = lm.model.layers[i], f"model.layers.{i}."
        fused = {
            layer.self_attn.qkv_proj: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            layer.self_attn.o_proj: ("self_attn.o_proj",),
            layer.mlp.ffn.gate_up_proj: ("mlp.gate_proj", "mlp.up_proj"),
            layer.mlp.ffn.down_proj: ("mlp.down_proj",),
        }
        for module, parts in fused.items():
            if isinstance(module, HybridLinear):  # the host's plan keeps dense copies for big batches
                module = module.small
            assert isinstance(module, Int4WeightOnlyLinear), type(module)
            expected = torch.cat([file[p + part + ".weight"].dequantize() for part in parts])
            assert torch.equal(module.dequantize(), expected), parts


def test_the_blocks_dequantize_like_the_gguf_package(smollm2):
    src, _ = smollm2
    plain = dict(GGUFCheckpoint(src.path).tensors())
    checked = 0
    for name, t in GGUFCheckpoint(src.path).tensors(q4_blocks=True):
        if isinstance(t, Q4Blocks) and ".layers.1." in name:
            assert torch.equal(t.dequantize(), plain[name]), name  # q/k rows un-permuted alike
            checked += 1
    assert checked == 7


def test_the_metadata_index_is_cached_and_reads_the_same_tensors(monkeypatch, tmp_path):
    """A warm start takes the config and tensor locations from the cached index (no parse) and
    reads the same bytes the gguf package does; a changed file or a broken index is re-parsed."""
    import gguf
    import shutil

    from pesc_serve.models import gguf_reader
    from pesc_serve.registry import smollm2_gguf_path

    monkeypatch.setenv("PESC_SERVE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copy(smollm2_gguf_path(), path)
    cold = GGUFCheckpoint(path)
    index = gguf_reader._index_file(path)
    assert index.is_file()

    def no_parse(*_a, **_k):
        raise AssertionError("parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_parse)
    warm = GGUFCheckpoint(path)
    assert warm.hf_config() == cold.hf_config() and warm.tensor_infos == cold.tensor_infos
    monkeypatch.undo()
    monkeypatch.setenv("PESC_SERVE_CACHE", str(tmp_path / "cache"))
    reader = gguf.GGUFReader(str(path))
    wanted = {t.name: t for t in reader.tensors}
    for info, (name, tensor) in zip(warm.tensor_infos[:12], warm.tensors()):
        t = wanted[info.name]
        from gguf.quants import dequantize

        assert torch.equal(tensor.view(-1), torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), np.float32)
                                                             .copy()).view(-1)) or ".q_proj." in name or ".k_proj." in name
    index.write_text("{broken")
    assert GGUFCheckpoint(path).hf_config() == cold.hf_config()  # rebuilt
    with path.open("ab") as f:  # a changed file: another key, parsed afresh
        f.write(b"\0" * 32)
    assert gguf_reader._index_file(path) != index
    GGUFCheckpoint(path)
    assert gguf_reader._index_file(path).is_file()


def test_the_lm_head_is_the_files_q8_0_blocks(smollm2):
    """The tied head's int8 values and float16 group scales are the file's Q8_0 blocks; the
    embedding lookup reads their exact float values; the head's output matches them."""
    from gguf import GGMLQuantizationType

    src, lm = smollm2
    if lm.quantization.lm_head != "int8":
        pytest.skip("this host's plan keeps the LM head in float")
    info = next(t for t in GGUFCheckpoint(src.path).tensor_infos if t.name == "token_embd.weight")
    assert info.ggml_type == GGMLQuantizationType.Q8_0
    blocks = dict(GGUFCheckpoint(src.path).tensors(q4_blocks=True))["model.embed_tokens.weight"]
    head = lm.model.lm_head
    assert head.group_wise and torch.equal(head.scale, blocks.scale)
    if head.packed is None:
        assert torch.equal(head.weight, blocks.q)
    assert torch.equal(lm.model.embed_tokens.weight, blocks.dequantize())
    x = torch.randn(3, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = head(x).float()
    want = x @ blocks.dequantize().t()
    assert float((got - want).norm() / want.norm()) < 2e-2  # int8 activations (VNNI) or bf16 (dense copy)


def test_grouped_int8_kernel_matches_its_dequantized_weight():
    from pesc_serve.kernels.build import load_extension

    ext = load_extension()
    if not ext.have_vnni():
        pytest.skip("no AVX512-VNNI on this CPU")
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (48, 96), generator=g, dtype=torch.int8)
    scale = (torch.rand(48, 3, generator=g) * 0.02 + 0.001).half()
    w = (q.float().view(48, 3, 32) * scale.float().unsqueeze(-1)).view(48, 96)
    x = torch.randn(5, 96, generator=g)
    got = ext.int8_linear(x, ext.PackedInt8(q, scale))
    want = x @ w.t()
    assert float((got - want).norm() / want.norm()) < 1e-2
