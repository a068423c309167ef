"""The C++ decode step (csrc/decode_model.h) against the PyTorch path it replaces."""

from __future__ import annotations

import pytest
import torch

from pesc_serve.config import EngineConfig, LoadConfig
from pesc_serve.engine.engine import LLMEngine
from pesc_serve.engine.request import SamplingParams
from pesc_serve.layers.attention import AttentionMetadata, PrefillChunk
from pesc_serve.deltas.table import DeltaTable
from pesc_serve.layers.pesc_mlp import ExpertSet, PescMLP
from pesc_serve.kernels.build import load_extension
from pesc_serve.kernels.cpu_kernels import (
    CpuKernels,
    GroupedAdapters,
    UnsupportedModel,
    build_decode_model,
    install_packed_kernels,
    try_build,
)
from pesc_serve.models import loader
from pesc_serve.models.loader import load_model
from pesc_serve.models.tokenizer import load_tokenizer
from pesc_serve.registry import resolve_model
from tests.fixtures.tiny_checkpoints import KINDS, make_checkpoint

BLOCK = 4


@pytest.fixture(scope="module")
def ext():
    return load_extension()


def _load(path: str, quantization: str = "none", dtype: str = "float32"):
    return load_model(resolve_model(path), LoadConfig(model=path, dtype=dtype, device="cpu", quantization=quantization))


def _python_decode(lm, kv, tokens, positions, tables):
    """One decode step through the PyTorch path, with per-row masks built from the tables."""
    cfg = lm.config
    ctx = max(positions) + 1
    slots = torch.tensor([[t[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx)] for t in tables])
    k_pos = torch.arange(ctx)[None, :]
    q_pos = torch.tensor(positions)[:, None]
    mask = k_pos <= q_pos
    if cfg.sliding_window:
        mask &= k_pos > q_pos - cfg.sliding_window
    meta = AttentionMetadata(
        slot_mapping=slots[torch.arange(len(tokens)), torch.tensor(positions)],
        num_decode_tokens=len(tokens),
        decode_slots=slots,
        decode_mask=mask[:, None, None, :],
    )
    return lm.model.compute_logits(lm.model(torch.tensor(tokens), torch.tensor(positions), kv, meta))


def _compare_decode_steps(ext, path: str, quantization: str, lengths: list[int], grouped: bool = False,
                          kv_dtype: torch.dtype = torch.float32) -> None:
    """Prefill with the PyTorch path, then three decode steps through both paths.

    ``grouped``: as the engine sets things up, weights are repacked for the extension's
    kernels (low-bit VNNI, or bf16 dense copies; both paths use them) and the C++ step runs
    the expert-grouped adapters, while the PyTorch path keeps the reference dispatch.
    """
    lm = _load(path, quantization)
    cfg = lm.config
    pesc = lm.delta is not None
    if grouped:
        assert install_packed_kernels(lm.model, ext) >= 4 * cfg.num_layers  # qkv, o, gate_up, down (+ LM head)
    dm = build_decode_model(lm.model, ext)
    table = DeltaTable(lm.model, CpuKernels(ext, lm.model, dm, grouped=grouped), 1)
    if pesc:
        table.install(0, lm.delta)
        assert all((0 in layer.mlp.packed_slots) == grouped for layer in lm.model.layers)
    # The reference: the same checkpoint on the PyTorch path with its reference dispatch (the
    # grouped kernel owns the packed model's only copy of the experts).
    ref_lm = _load(path, quantization)
    if grouped:
        install_packed_kernels(ref_lm.model, ext)
    torch.manual_seed(0)
    per_seq = max(8, (max(lengths) + 3) // BLOCK + 1)  # room for three more tokens
    num_blocks = per_seq * len(lengths) + 8
    tables = [list(torch.randperm(num_blocks)[:per_seq].tolist()) for _ in lengths]
    kv = torch.zeros(cfg.num_layers, 2, num_blocks * BLOCK, cfg.num_kv_heads, cfg.head_dim, dtype=kv_dtype)
    with torch.inference_mode():
        for n, table in zip(lengths, tables):  # prefill each sequence with the PyTorch path
            slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
            ref_lm.model(torch.randint(3, 300, (n,)), torch.arange(n), kv,
                     AttentionMetadata(slot_mapping=slots, prefills=[PrefillChunk(0, n, slots, _causal(n, cfg.sliding_window))]))
        kv_c = kv.clone()
        tokens, positions = [(7 + 13 * i) % 300 for i in range(len(lengths))], list(lengths)
        for step in range(3):  # three decode steps, both paths writing their own caches
            ref = _python_decode(ref_lm, kv, tokens, positions, tables)
            slots = torch.tensor([t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, positions)])
            got, choices = dm.forward(torch.tensor(tokens), torch.tensor(positions), kv_c, slots, torch.tensor(tables), BLOCK,
                                      torch.zeros(len(tokens), dtype=torch.long))
            rows = torch.ones(len(tokens), dtype=torch.bool)
            if pesc:  # a near-tie can route a token differently: compare the others
                for layer, chosen in zip(ref_lm.model.layers, choices):
                    rows &= (chosen.sort(-1).values == layer.mlp.last_topk.sort(-1).values).all(-1)
                assert int(rows.sum()) >= len(tokens) - (0 if quantization == "none" else 1)
            got, ref_rows = got[rows], ref[rows]
            if quantization == "none":
                assert torch.allclose(got, ref_rows, atol=1e-4, rtol=1e-4), f"step {step}: {(got - ref_rows).abs().max()}"
            else:  # the kernels round activations differently (bf16 in ATen's, int8 in the VNNI ones)
                rel = float((got - ref_rows).norm() / ref_rows.norm())
                assert rel < 2e-2, f"{quantization} step {step}: relative error {rel}"
            kv_rel = float((kv_c.float() - kv.float()).norm() / kv.float().norm())
            # float16 rounding can flip one ulp (~1e-3) where two float32 values straddle a boundary
            exact = 1e-5 if kv_dtype == torch.float32 else 1e-3
            assert kv_rel < (exact if quantization == "none" else 2e-2), f"KV cache differs: {kv_rel}"
            if pesc:
                assert choices.shape == (cfg.num_layers, len(lengths), lm.delta.topk)
                assert int(choices.min()) >= 0 and int(choices.max()) < lm.delta.num_experts
            tokens = ref.argmax(-1).tolist()
            positions = [p + 1 for p in positions]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_decode_step_matches_pytorch(ext, tiny_checkpoint_factory, kind, quantization):
    _compare_decode_steps(ext, str(tiny_checkpoint_factory(kind)), quantization, [13, 5, 9])


@pytest.mark.parametrize("kind", ["camelidae", "qwen2idae", "mistral"])
def test_decode_step_with_a_float16_cache_matches_pytorch(ext, tiny_checkpoint_factory, kind):
    """Both paths round K/V to float16 the same way and attend in float32."""
    _compare_decode_steps(ext, str(tiny_checkpoint_factory(kind)), "none", [13, 5, 9], kv_dtype=torch.float16)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_float16_cache_with_vectorised_heads(ext, tmp_path, head_dim):
    path = make_checkpoint("camelidae", tmp_path, hidden_size=2 * head_dim, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=head_dim, intermediate_size=96)
    _compare_decode_steps(ext, str(path), "none", [13, 5, 9, 2, 7, 21, 3], kv_dtype=torch.float16)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("kind", "lengths"), [("camelidae", [250]), ("camelidae", [200, 130]),
                                               ("mistral", [250, 9])])  # mistral: its 8-token window keeps chunks whole
def test_long_contexts_split_into_merged_chunks(ext, tiny_checkpoint_factory, kind, lengths, kv_dtype):
    """One or two long sequences leave threads idle: their contexts are split and the chunks'
    softmaxes merged (with a short sequence beside them, that one stays whole)."""
    _compare_decode_steps(ext, str(tiny_checkpoint_factory(kind)), "none", lengths, kv_dtype=kv_dtype)


@pytest.mark.parametrize("kind", ["camelidae", "sparsetral"])
def test_decode_step_with_grouped_adapters_matches_pytorch(ext, tiny_checkpoint_factory, kind):
    if not ext.have_bf16_gemm():
        pytest.skip("no AVX512-BF16 on this CPU")
    _compare_decode_steps(ext, str(tiny_checkpoint_factory(kind)), "int4", [13, 5, 9, 3, 11], grouped=True)


def test_packed_gemm_replaces_the_dense_copy(ext, tiny_checkpoint_factory, monkeypatch):
    if not ext.have_bf16_gemm():
        pytest.skip("no AVX512-BF16 on this CPU")
    from pesc_serve.kernels.cpu_features import CpuFeatures
    from pesc_serve.kernels.plan import choose_plan

    no_vnni = choose_plan(CpuFeatures(avx512=True, avx512_bf16=True), None)  # the plan that keeps dense copies
    monkeypatch.setattr(loader, "cpu_kernel_plan", lambda cfg: no_vnni)
    lm = _load(str(tiny_checkpoint_factory("qwen2idae")), "int4")
    layer = lm.model.layers[0].self_attn.qkv_proj
    x = torch.randn(7, lm.config.hidden_size)  # above the hybrid threshold: the dense part runs
    with torch.no_grad():
        before = layer(x)
        plain = layer.large.weight
        assert install_packed_kernels(lm.model, ext) > 0
        after = layer(x)
    assert layer.large.weight is layer.large.packed.data and layer.large.weight.numel() >= plain.numel()
    exact = torch.nn.functional.linear(x.bfloat16().float(), plain.float(), layer.large.bias)
    assert torch.allclose(after, exact, atol=1e-4, rtol=1e-4)  # float32 accumulation and output, bias added
    assert torch.allclose(before, exact, atol=2e-2, rtol=1e-2)  # ATen rounds its output to bf16


def _random_experts(num_experts: int, topk: int, dim: int, hidden: int, seed: int, dtype=torch.float32) -> ExpertSet:
    g = torch.Generator().manual_seed(seed)
    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).to(dtype)
    return ExpertSet(rnd(num_experts, hidden), rnd(num_experts, dim, hidden), rnd(num_experts, hidden, dim), topk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_grouped_adapters_match_the_reference_dispatch(ext, dtype, tokens):
    """One stacked kernel call over three deltas of different geometry (and base rows without
    experts) against each delta's PyTorch dispatch on its own rows."""
    if not ext.have_bf16_gemm():
        pytest.skip("no AVX512-BF16 on this CPU")
    torch.manual_seed(tokens)
    hidden = 96
    mlp = PescMLP(hidden, 160).to(dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.2)
    sets = {1: _random_experts(6, 2, 16, hidden, 1, dtype), 2: _random_experts(4, 1, 8, hidden, 2, dtype),
            4: _random_experts(8, 3, 16, hidden, 3, dtype)}
    stack = ext.AdapterStack()
    for slot, es in sets.items():
        mlp.experts[slot] = es
        stack.set(slot, ext.PackedAdapters(es.router, es.down, es.up, es.topk))
    slots = torch.tensor([(0, 1, 2, 4)[i % 4] for i in range(tokens)])
    x = torch.randn(tokens, hidden, dtype=dtype)
    with torch.no_grad():
        f = mlp.ffn(x)
        got, ids = GroupedAdapters(ext, stack)(x, f, slots, 3)
        for slot in (0, 1, 2, 4):
            rows = slots == slot
            if not rows.any():
                continue
            if slot == 0:  # the base: no experts, the FFN output passes unchanged
                assert torch.equal(got[rows], f[rows]) and (ids[rows] == -1).all()
                continue
            es = sets[slot]
            ref_es = ExpertSet(es.router.float(), es.down.float(), es.up.float(), es.topk)  # routing in float32
            ref, ref_ids = ref_es.apply(x[rows].float(), f[rows].float(), "loop")
            assert torch.equal(ids[rows, : es.topk].sort(-1).values, ref_ids.sort(-1).values)
            assert (ids[rows, es.topk:] == -1).all()
            delta_ref, delta = ref - f[rows].float(), got[rows].float() - f[rows].float()
            assert float((delta - delta_ref).norm() / delta_ref.norm()) < 3e-2
    assert got.dtype == dtype and got.shape == x.shape


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_decode_step_with_vectorised_head_sizes_and_big_batches(ext, tmp_path, head_dim, quantization):
    """Head sizes 64 and 128 take the AVX-512 attention; 11 rows cover the GEMM's row tails
    and the one-task-per-KV-head split; vocab and FFN widths are not multiples of its tiles."""
    path = make_checkpoint("sparsetral", tmp_path, hidden_size=2 * head_dim, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=head_dim, intermediate_size=100)
    _compare_decode_steps(ext, str(path), quantization, [13, 5, 9, 2, 7, 21, 3, 4, 17, 6, 8])


@pytest.mark.parametrize("rows", [1, 3, 8, 11, 17])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (80, 64), (100, 33), (1000, 130)])  # last tile: 3, 2, 1, 3 vectors
def test_bf16_gemm_matches_aten(ext, rows, n, k):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, k), torch.randn(n, k).bfloat16()
    got = ext.bf16_linear(x, ext.PackedBf16(w))
    ref = x.bfloat16().float() @ w.float().t()
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)


def _causal(n: int, window: int | None) -> torch.Tensor:
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    mask = k <= q
    if window:
        mask &= k > q - window
    return mask


@pytest.mark.parametrize("kv_cache_dtype", ["model", "auto", "bfloat16"])
def test_engine_outputs_identical_with_and_without_kernels(tiny_checkpoint_factory, kv_cache_dtype):
    path = str(tiny_checkpoint_factory("camelidae"))
    lm = _load(path)
    tok = load_tokenizer(resolve_model(path))
    outs = []
    for kernels in ("off", "on" if kv_cache_dtype != "bfloat16" else "auto"):
        engine = LLMEngine(lm, tok, EngineConfig(max_num_seqs=4, max_model_len=128, kv_cache_memory_gb=0.01,
                                                 cpu_kernels=kernels, block_size=4, kv_cache_dtype=kv_cache_dtype))
        kv_dtype = {"model": torch.float32, "auto": torch.float16, "bfloat16": torch.bfloat16}[kv_cache_dtype]
        assert engine.runner.kv_caches.dtype == kv_dtype
        if kv_dtype == torch.bfloat16:  # not a cache the C++ step reads: the PyTorch path serves both runs
            assert engine.runner.decode_model is None
        else:
            assert (engine.runner.decode_model is not None) == (kernels != "off")
        for i in range(3):
            engine.add_request(str(i), [5 + i, 9, 33, 70, 11][: 3 + i], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        got: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for o in engine.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        outs.append((got, {k: v.clone() for k, v in engine.expert_load.snapshot().items()}))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1].keys() == outs[1][1].keys() == {engine.models.primary.name}
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])  # router-load metrics agree too


def test_unsupported_models_fall_back_or_fail_clearly(ext, tiny_checkpoint_factory):
    path = str(tiny_checkpoint_factory("llama"))
    bf16 = _load(path, dtype="bfloat16")
    with pytest.raises(UnsupportedModel, match="float32"):
        build_decode_model(bf16.model, ext)
    assert try_build(bf16.model, "auto").decode_model is None  # the PyTorch path keeps the packed GEMMs
    with pytest.raises(ValueError, match="--cpu-kernels on"):
        try_build(bf16.model, "on")
    assert try_build(_load(path).model, "off") is None
    with pytest.raises(ValueError, match="float32 or float16 KV cache"):
        try_build(_load(path).model, "on", torch.bfloat16)
    assert try_build(_load(path).model, "auto", torch.bfloat16) is None  # the PyTorch path serves it


def test_a_build_lock_left_by_a_killed_build_is_cleared(tmp_path):
    """torch's builder waits forever on its lock file; only one older than any build is removed."""
    import os
    import time

    from pesc_serve.kernels.build import clear_stale_build_lock

    lock = tmp_path / "lock"
    assert not clear_stale_build_lock(tmp_path)  # none there
    lock.touch()
    assert not clear_stale_build_lock(tmp_path, max_age_s=600) and lock.exists()  # a build in progress
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_build_lock(tmp_path, max_age_s=600) and not lock.exists()


def test_the_extension_builds_per_python_and_torch_version(monkeypatch, tmp_path):
    from pesc_serve.kernels.build import build_directory

    monkeypatch.setenv("PESC_SERVE_CACHE", str(tmp_path))
    d = build_directory()
    assert d.parent == tmp_path / "kernels" and torch.__version__ in d.name


def test_the_extension_builds_per_cpu(monkeypatch, tmp_path):
    """-march=native: a build cached on one CPU must not be loaded on another."""
    from pesc_serve.kernels import build, cpu_features

    monkeypatch.setenv("PESC_SERVE_CACHE", str(tmp_path))
    here = build.build_directory()
    amd = "model name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_vnni avx512_bf16\n"
    intel = "model name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx512f avx512_vnni avx512_bf16 amx_tile amx_int8\n"
    dirs = {}
    for name, text in (("amd", amd), ("intel", intel)):
        monkeypatch.setattr(cpu_features, "cpu_info_text", lambda text=text: text)
        dirs[name] = build.build_directory()
    assert dirs["amd"] != dirs["intel"] and here not in dirs.values()
    assert all(d.parent == here.parent for d in dirs.values())


def test_the_extension_builds_anew_when_a_header_changes(monkeypatch, tmp_path):
    """The extension is one source file and its headers: an edited header must not load the
    build of the old one."""
    from pesc_serve.kernels import build

    for f in build.CSRC.glob("*.[ch]*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(build, "CSRC", tmp_path)
    before = build.build_directory()
    header = tmp_path / "lora.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert build.build_directory() != before