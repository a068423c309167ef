"""The same model, engine and server on a CUDA device (run by benchmarks/gpu_check.sh).

Skipped where no GPU is present; on a GPU machine these must pass.
"""

from __future__ import annotations

import pytest
import torch

from pesc_serve.config import EngineConfig, LoadConfig
from pesc_serve.engine.engine import LLMEngine
from pesc_serve.engine.request import SamplingParams
from pesc_serve.layers.attention import AttentionMetadata, PrefillChunk
from pesc_serve.models.loader import load_model
from pesc_serve.models.tokenizer import load_tokenizer
from pesc_serve.registry import resolve_model
from tests.fixtures.tiny_checkpoints import KINDS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_matmuls():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _prefill_logits(lm, ids: list[int]) -> torch.Tensor:
    cfg, dev = lm.config, lm.device
    n = len(ids)
    kv = torch.zeros(cfg.num_layers, 2, 64, cfg.num_kv_heads, cfg.head_dim, dtype=lm.dtype, device=dev)
    q = torch.arange(n, device=dev)[:, None]
    k = torch.arange(n, device=dev)[None, :]
    mask = (k <= q) & ((k > q - cfg.sliding_window) if cfg.sliding_window else True)
    slots = torch.arange(n, device=dev)
    meta = AttentionMetadata(slot_mapping=slots, prefills=[PrefillChunk(0, n, slots, mask)])
    with torch.inference_mode():
        return lm.model.compute_logits(lm.model(torch.tensor(ids, device=dev), slots, kv, meta)).cpu()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dispatch", ["gather", "dense", "grouped", "padded", "auto"])
def test_cuda_matches_cpu_float32(tiny_checkpoint_factory, kind, dispatch):
    path = str(tiny_checkpoint_factory(kind))
    ids = [5, 9, 33, 70, 11, 8, 41, 19, 3, 77, 12, 6]
    cpu = load_model(resolve_model(path), LoadConfig(model=path, dtype="float32", device="cpu", dispatch=dispatch))
    gpu = load_model(resolve_model(path), LoadConfig(model=path, dtype="float32", device="cuda", dispatch=dispatch))
    assert torch.allclose(_prefill_logits(gpu, ids), _prefill_logits(cpu, ids), atol=1e-4)


@pytest.mark.parametrize("quantization", ["auto", "int8", "nf4"])
def test_cuda_engine_generates(tiny_checkpoint_factory, quantization):
    path = str(tiny_checkpoint_factory("camelidae"))
    src = resolve_model(path)
    lm = load_model(src, LoadConfig(model=path, dtype="auto", device="cuda", quantization=quantization))
    assert lm.dtype in (torch.bfloat16, torch.float16)
    engine = LLMEngine(lm, load_tokenizer(src), EngineConfig(max_num_seqs=8, max_model_len=128))
    for i in range(4):
        engine.add_request(str(i), [5 + i, 9, 33, 70], SamplingParams(max_tokens=12, temperature=0.7, seed=i, ignore_eos=True))
    done = 0
    while engine.has_unfinished():
        done += sum(o.finished for o in engine.step())
    assert done == 4 and engine.kv.usage == 0


def test_cuda_greedy_equals_cpu_greedy(tiny_checkpoint_factory):
    path = str(tiny_checkpoint_factory("qwen2idae"))
    src = resolve_model(path)
    outs = []
    for device in ("cpu", "cuda"):
        lm = load_model(src, LoadConfig(model=path, dtype="float32", device=device))
        engine = LLMEngine(lm, load_tokenizer(src), EngineConfig(max_num_seqs=4, max_model_len=128))
        engine.add_request("a", [5, 9, 33, 70, 11], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        toks = []
        while engine.has_unfinished():
            for o in engine.step():
                toks += o.new_token_ids
        outs.append(toks)
    assert outs[0] == outs[1]
