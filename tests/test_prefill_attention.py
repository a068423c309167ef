"""The C++ prefill attention (csrc/attention.h) against plain softmax attention over the same
paged KV cache, and its independence from how a prompt is chunked."""

from __future__ import annotations

import pytest
import torch

from pesc_serve.kernels.build import load_extension

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cache(hkv: int, d: int, blocks: int, block_size: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, blocks * block_size, hkv, d, generator=g).to(dtype)


def _reference(q: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, start: int, block_size: int,
               window: int | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per query, over its causal (and windowed) keys, in float64."""
    n, hq, d = q.shape
    hkv = cache.shape[2]
    positions = torch.arange(start + n)
    slots = table[positions // block_size] * block_size + positions % block_size
    k, v = cache[0, slots].double(), cache[1, slots].double()  # [ctx, Hkv, D]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    for i in range(n):
        pos = start + i
        lo = max(0, pos - window + 1) if window else 0
        for h in range(hq):
            kv = h // (hq // hkv)
            scores = (k[lo : pos + 1, kv] @ q[i, h].double()) / d**0.5
            out[i, h] = torch.softmax(scores, 0) @ v[lo : pos + 1, kv]
    return out


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
@pytest.mark.parametrize("start,n,window", [(0, 1, None), (0, 77, None), (5, 16, None), (130, 33, None),
                                            (0, 100, 20), (90, 40, 64)])
def test_prefill_attention_matches_softmax_attention(kv_dtype, hq, hkv, d, start, n, window):
    ext = load_extension()
    block_size = 16
    blocks = -(-(start + n) // block_size)
    cache = _cache(hkv, d, blocks + 5, block_size, kv_dtype, seed=start + n)
    table = torch.randperm(blocks + 5, generator=torch.Generator().manual_seed(1))[:blocks].contiguous()
    # q as the model hands it over: the heads of a wider qkv row (row stride > Hq * D)
    qkv = torch.randn(n, hq + 2 * hkv, d, generator=torch.Generator().manual_seed(2))
    q = qkv[:, :hq]
    out = ext.prefill_attention(q, cache, table, start, block_size, window or -1)
    assert out.shape == (n, hq, d)
    torch.testing.assert_close(out.double(), _reference(q, cache, table, start, block_size, window), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 24])
def test_a_position_gets_the_same_numbers_however_its_prompt_is_chunked(window):
    """Key blocks are aligned to absolute positions and visited in order: one chunk, three
    chunks or a chunk after a cached prefix give every position bit-identical outputs."""
    ext = load_extension()
    block_size, n, hq, hkv, d = 16, 150, 9, 3, 64
    cache = _cache(hkv, d, 12, block_size, torch.float16, seed=3)
    table = torch.randperm(12, generator=torch.Generator().manual_seed(4))[:10].contiguous()
    q = torch.randn(n, hq, d, generator=torch.Generator().manual_seed(5))
    whole = ext.prefill_attention(q, cache, table, 0, block_size, window or -1)
    parts = [ext.prefill_attention(q[a:b], cache, table, a, block_size, window or -1)
             for a, b in ((0, 37), (37, 64), (64, 150))]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("window", [None, 40])
def test_several_threads_give_the_one_thread_numbers(window):
    """The context is staged once by the calling thread and read by every OpenMP thread's tasks
    (a thread_local the task lambda did not capture crashed the second thread); the tasks'
    split does not change any number."""
    ext = load_extension()
    block_size, start, n, hq, hkv, d = 16, 70, 200, 9, 3, 64
    blocks = -(-(start + n) // block_size)
    cache = _cache(hkv, d, blocks, block_size, torch.float16, seed=6)
    table = torch.arange(blocks)
    q = torch.randn(n, hq, d, generator=torch.Generator().manual_seed(7))
    one = ext.prefill_attention(q, cache, table, start, block_size, window or -1)
    torch.set_num_threads(3)
    try:
        several = ext.prefill_attention(q, cache, table, start, block_size, window or -1)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(several, one)
    torch.testing.assert_close(one.double(), _reference(q, cache, table, start, block_size, window), atol=2e-5, rtol=1e-4)


def test_bad_arguments_are_refused():
    ext = load_extension()
    cache = _cache(3, 64, 4, 16, torch.float16, seed=0)
    q = torch.randn(20, 9, 64)
    with pytest.raises(RuntimeError, match="does not cover"):
        ext.prefill_attention(q, cache, torch.tensor([0]), 0, 16, -1)  # 20 positions need 2 blocks
    with pytest.raises(RuntimeError, match="out of range"):
        ext.prefill_attention(q, cache, torch.tensor([0, 9]), 0, 16, -1)
    with pytest.raises(RuntimeError, match="float32"):
        ext.prefill_attention(q.half(), cache, torch.tensor([0, 1]), 0, 16, -1)
