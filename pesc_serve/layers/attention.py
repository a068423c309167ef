"""Grouped-query attention over a paged KV cache.

The model sees one flat batch of tokens (no padding).  The engine orders it as
``[decode tokens..., prefill chunk 0..., prefill chunk 1...]`` and describes it with an
:class:`AttentionMetadata`:

* every new token's K/V is written to its cache slot (``slot_mapping``);
* all single-token decodes attend in ONE batched call over their gathered context;
* each prefill chunk attends on its own: straight causal attention over the fresh K/V when
  it has no earlier context, else over its context gathered from the cache.

The KV cache of one layer is ``[2, num_slots, num_kv_heads, head_dim]`` where a slot is
``block_id * block_size + offset``; block tables live in the engine, the metadata only
carries slot indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens ``[q_start, q_end)`` in the flat batch.

    ``context_slots`` is None when the chunk starts at position 0 (nothing cached to read);
    otherwise it holds the slots of all ``ctx_len`` keys the chunk sees, new ones included.
    ``mask`` is a ``[q_len, ctx_len]`` boolean (True = attend) for the gathered case, or for
    a fresh chunk under a sliding window.
    """

    q_start: int
    q_end: int
    context_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    start: int = 0  # the chunk's first position in its sequence
    block_table: torch.Tensor | None = None  # the sequence's KV blocks covering the chunk (CPU kernel)


@dataclass
class AttentionMetadata:
    """Where the flat batch's tokens go in the cache and what each one attends to."""

    slot_mapping: torch.Tensor  # [T] long
    num_decode_tokens: int = 0
    decode_slots: torch.Tensor | None = None  # [Bd, max_ctx] long (padded with slot 0)
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, max_ctx] bool
    prefills: list[PrefillChunk] = field(default_factory=list)
    block_size: int = 0


def write_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store this step's K/V ([T, Hkv, D]) into their slots of ``kv_cache`` [2, S, Hkv, D]
    (rounded to the cache's dtype, e.g. float16 under a float32 model on CPU)."""
    kv_cache[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    kv_cache[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _as_cached(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded as the cache stores it: a fresh chunk then sees the same keys and values
    as a chunked prefill or a decode reading them back (same tokens whatever the chunking)."""
    return x if x.dtype == cache_dtype else x.to(cache_dtype).to(x.dtype)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    prefill_kernel: Callable | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] for the new tokens -> output [T, Hq, D].

    ``prefill_kernel`` (the C++ blocked attention, installed on CPU by kernels/cpu_kernels.py)
    serves the prompt chunks straight from the KV blocks, with ``window`` the sliding window."""
    write_kv(kv_cache, meta.slot_mapping, k, v)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    nd = meta.num_decode_tokens
    if nd:
        slots = meta.decode_slots
        kv = kv_cache.index_select(1, slots.reshape(-1)).view(2, *slots.shape, *kv_cache.shape[2:])  # [2, Bd, ctx, Hkv, D]
        kv = kv.to(q.dtype)
        kc, vc = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [Bd, Hkv, max_ctx, D]
        qd = q[:nd].unsqueeze(2)  # [Bd, Hq, 1, D]
        o = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa)
        out[:nd] = o.squeeze(2)
    use_kernel = prefill_kernel is not None and q.dtype == torch.float32 and q.device.type == "cpu"
    for chunk in meta.prefills:
        if use_kernel and chunk.block_table is not None:
            out[chunk.q_start : chunk.q_end] = prefill_kernel(
                q[chunk.q_start : chunk.q_end], kv_cache, chunk.block_table, chunk.start, meta.block_size,
                window if window is not None else -1)
            continue
        qs = q[chunk.q_start : chunk.q_end].transpose(0, 1)  # [Hq, L, D]
        if chunk.context_slots is None:
            ks = _as_cached(k[chunk.q_start : chunk.q_end], kv_cache.dtype).transpose(0, 1)
            vs = _as_cached(v[chunk.q_start : chunk.q_end], kv_cache.dtype).transpose(0, 1)
        else:
            kv = kv_cache.index_select(1, chunk.context_slots).to(q.dtype)  # [2, ctx, Hkv, D]
            ks, vs = kv[0].transpose(0, 1), kv[1].transpose(0, 1)
        causal = chunk.mask is None
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=chunk.mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        out[chunk.q_start : chunk.q_end] = o.transpose(0, 1)
    return out
