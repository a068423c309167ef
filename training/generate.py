"""Small batched greedy generation on the serving model, for evaluation and data building.

It drives :class:`PescForCausalLM` the way the engine does (flat tokens, paged KV cache,
:class:`AttentionMetadata`) but with a trivial slot layout: sequence ``i`` owns slots
``[i * max_len, (i + 1) * max_len)``.  No scheduler, no sampling: argmax until a stop id.
"""

from __future__ import annotations

import torch

from pesc_serve.layers.attention import AttentionMetadata, PrefillChunk
from pesc_serve.models.decoder import PescForCausalLM


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[len(q), len(k)] bool: causal, and inside the sliding window when there is one."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window:
        allowed &= q_pos[:, None] - k_pos[None, :] < window
    return allowed


@torch.no_grad()
def _generate_batch(model: PescForCausalLM, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
    cfg = model.config
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    n = len(prompts)
    max_len = max(len(p) for p in prompts) + max_new_tokens
    kv = torch.zeros(cfg.num_layers, 2, n * max_len, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
    window = cfg.sliding_window
    ids, pos, slots, chunks, start = [], [], [], [], 0
    for i, p in enumerate(prompts):
        t = torch.arange(len(p))
        ids.append(torch.tensor(p))
        pos.append(t)
        slots.append(i * max_len + t)
        mask = _window_mask(t, t, window) if window and len(p) > window else None
        chunks.append(PrefillChunk(start, start + len(p), mask=mask))
        start += len(p)
    meta = AttentionMetadata(slot_mapping=torch.cat(slots).to(device), prefills=chunks)
    hidden = model(torch.cat(ids).to(device), torch.cat(pos).to(device), kv, meta)
    last = torch.tensor([c.q_end - 1 for c in chunks], device=device)
    next_ids = model.compute_logits(hidden[last]).argmax(-1).tolist()
    outputs: list[list[int]] = [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    active = list(range(n))
    for _ in range(max_new_tokens):
        still = []
        for j, i in enumerate(active):
            tok = next_ids[j]
            if tok in stop_ids:
                continue
            outputs[i].append(tok)
            if len(outputs[i]) < max_new_tokens:
                still.append((i, tok))
        if not still:
            break
        active = [i for i, _ in still]
        positions = torch.tensor([lengths[i] + len(outputs[i]) - 1 for i in active])
        ctx = int(positions.max()) + 1
        k_pos = torch.arange(ctx)
        decode_slots = torch.stack([i * max_len + k_pos for i in active])
        decode_mask = torch.stack([_window_mask(positions[j : j + 1], k_pos, window)[0] for j in range(len(active))])
        meta = AttentionMetadata(
            slot_mapping=(torch.tensor(active) * max_len + positions).to(device),
            num_decode_tokens=len(active),
            decode_slots=decode_slots.to(device),
            decode_mask=decode_mask[:, None, None, :].to(device),
        )
        hidden = model(torch.tensor([t for _, t in still], device=device), positions.to(device), kv, meta)
        next_ids = model.compute_logits(hidden).argmax(-1).tolist()
    return outputs


def greedy_generate(
    model: PescForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: set[int],
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuations (stop token excluded) of every prompt, in input order.

    Prompts are batched by length so that short ones do not wait for long ones.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, out in zip(idx, _generate_batch(model, [prompts[i] for i in idx], max_new_tokens, stop_ids)):
            results[i] = out
    return results


def stop_ids_for(tokenizer, eos_token_ids: tuple[int, ...]) -> set[int]:
    """End-of-turn ids: the config's EOS ids plus the tokenizer's EOS."""
    ids = set(eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
