"""Scheduler output -> batch tensors -> model -> sampler.

Owns the KV-cache tensor ``[L, 2, num_blocks * block_size, Hkv, D]`` and turns each
step's chunks into one flat token batch plus :class:`AttentionMetadata`.  Logits are only
computed for the rows that sample (the last token of each chunk that reaches the end).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pesc_serve.config import ModelConfig
from pesc_serve.deltas.batch import DeltaBatch
from pesc_serve.engine.request import Request, SamplingParams
from pesc_serve.engine.scheduler import ScheduledChunk, SchedulerOutput
from pesc_serve.layers.attention import AttentionMetadata, PrefillChunk
from pesc_serve.layers.sampler import SamplerOutput, SamplingBatch, sample
from pesc_serve.models.decoder import PescForCausalLM


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed KV cache.  On CPU from calloc'd memory (numpy's zeros): the OS hands out zero
    pages as they are first written, so a 4 GiB cache costs no start-up time and resident memory
    grows with use, where torch.zeros would write every byte first (seconds)."""
    if device.type == "cpu" and dtype in (torch.float32, torch.float16):
        import numpy as np

        return torch.from_numpy(np.zeros(shape, dtype=np.float32 if dtype == torch.float32 else np.float16))
    return torch.zeros(shape, dtype=dtype, device=device)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class StepResult:
    """Sampled tokens for the chunks that sample, in ``requests`` order."""

    requests: list[Request]
    sampled: SamplerOutput
    # (local expert ids [L, T, k] with -1 pads, delta slot of each row) per part of the step
    expert_choices: list[tuple[torch.Tensor, list[int]]] = field(default_factory=list)
    # request id -> the scores of the prompt tokens this step's chunk reached (prompt_logprobs)
    prompt_logprobs: dict[str, "PromptScores"] = field(default_factory=dict)


@dataclass
class PromptScores:
    """Logprobs of prompt tokens ``first + 1`` .. ``first + n`` (each scored by the position before it)."""

    first: int
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


PROMPT_SCORE_ROWS = 256  # prompt positions per LM-head pass: bounds the [rows, vocab] logits


class ModelRunner:
    def __init__(
        self,
        model: PescForCausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_dtype: torch.dtype,
        eos_token_ids: tuple[int, ...],
        decode_model: object | None = None,
    ) -> None:
        cfg = model.config
        self.decode_model = decode_model  # the C++ decode step (kernels/cpu_kernels.py), if built
        self.model = model
        self.config = cfg
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.kv_caches = _zeros((cfg.num_layers, 2, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim), kv_dtype, device)
        self._generators: dict[str, torch.Generator] = {}
        self._block_offsets = torch.arange(block_size, device=device)

    # ---- input preparation -------------------------------------------------------------

    def _slots(self, req: Request, start: int, end: int) -> list[int]:
        bs, blocks = self.block_size, req.block_ids
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def _context_slots(self, block_table: torch.Tensor, ctx_len: int) -> torch.Tensor:
        return (block_table.unsqueeze(-1) * self.block_size + self._block_offsets).flatten(-2)[..., :ctx_len]

    def _window_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = valid & (k_pos <= q_pos)
        window = self.config.sliding_window
        if window is not None:
            mask &= k_pos > q_pos - window
        return mask

    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        decodes = [c for c in chunks if c.num_new_tokens == 1 and c.start > 0]
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode_tokens=len(decodes), block_size=self.block_size)
        for c in chunks:
            end = c.start + c.num_new_tokens
            ids.extend(c.request.all_token_ids[c.start : end])
            positions.extend(range(c.start, end))
            slots.extend(self._slots(c.request, c.start, end))
            if c.samples:
                sample_rows.append(len(ids) - 1)
        if decodes:
            ctx = torch.tensor([c.start + 1 for c in decodes], device=dev)
            max_ctx = int(max(c.start + 1 for c in decodes))
            max_blocks = -(-max_ctx // self.block_size)
            table = torch.tensor([c.request.block_ids[:max_blocks] + [0] * (max_blocks - len(c.request.block_ids[:max_blocks])) for c in decodes], device=dev)
            meta.decode_slots = self._context_slots(table, max_ctx)
            k_pos = torch.arange(max_ctx, device=dev).unsqueeze(0)
            q_pos = (ctx - 1).unsqueeze(1)
            meta.decode_mask = self._window_mask(q_pos, k_pos, k_pos < ctx.unsqueeze(1))[:, None, None, :]
        offset = len(decodes)
        for c in chunks[len(decodes) :]:
            n = c.num_new_tokens
            blocks = -(-(c.start + n) // self.block_size)
            chunk = PrefillChunk(offset, offset + n, start=c.start, block_table=torch.tensor(c.request.block_ids[:blocks]))
            window = self.config.sliding_window
            if c.start > 0 or (window is not None and n > window):
                ctx_len = c.start + n
                chunk.context_slots = torch.tensor(self._slots(c.request, 0, ctx_len), device=dev)
                q_pos = torch.arange(c.start, ctx_len, device=dev).unsqueeze(1)
                k_pos = torch.arange(ctx_len, device=dev).unsqueeze(0)
                chunk.mask = self._window_mask(q_pos, k_pos, torch.ones_like(k_pos, dtype=torch.bool))
            meta.prefills.append(chunk)
            offset += n
        meta.slot_mapping = torch.tensor(slots, device=dev)
        return torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta, sample_rows

    # ---- sampling ----------------------------------------------------------------------

    def _generator(self, req: Request) -> torch.Generator | None:
        if req.params.seed is None:
            return None
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(req.params.seed)
            self._generators[req.request_id] = gen
        return gen

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sampling_batch(self, reqs: list[Request]) -> SamplingBatch:
        dev = self.device
        ps: list[SamplingParams] = [r.params for r in reqs]
        vocab = self.config.vocab_size

        def column(values: list[float], skip_if: float, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            if all(v == skip_if for v in values):
                return None
            return torch.tensor(values, dtype=dtype, device=dev)

        def padded(rows: list[list[int]]) -> torch.Tensor:
            width = max(1, max(len(r) for r in rows))
            return torch.tensor([r + [-1] * (width - len(r)) for r in rows], device=dev)

        b = SamplingBatch(temperature=torch.tensor([p.temperature for p in ps], device=dev))
        b.all_greedy = all(p.temperature == 0 for p in ps)
        b.top_p = column([p.top_p for p in ps], 1.0)
        b.top_k = column([max(p.top_k, 0) for p in ps], 0, torch.long)
        b.min_p = column([p.min_p for p in ps], 0.0)
        if any(p.seed is not None for p in ps):
            b.generators = [self._generator(r) for r in reqs]
        b.presence_penalty = column([p.presence_penalty for p in ps], 0.0)
        b.frequency_penalty = column([p.frequency_penalty for p in ps], 0.0)
        b.repetition_penalty = column([p.repetition_penalty for p in ps], 1.0)
        if b.presence_penalty is not None or b.frequency_penalty is not None:
            b.output_token_ids = padded([r.output_token_ids for r in reqs])
        if b.repetition_penalty is not None:
            b.seen_token_ids = padded([r.all_token_ids for r in reqs])
        if any(p.logit_bias for p in ps):
            b.logit_bias = torch.zeros(len(reqs), vocab, device=dev)
            for row, p in enumerate(ps):
                for tid, bias in p.logit_bias.items():
                    b.logit_bias[row, tid] = bias
        banned = [row for row, r in enumerate(reqs) if len(r.output_token_ids) < r.params.min_tokens]
        constrained = [row for row, r in enumerate(reqs) if r.structured_output is not None]
        if banned or constrained:
            b.banned_token_mask = torch.zeros(len(reqs), vocab, dtype=torch.bool, device=dev)
            for row in banned:
                ids = set(reqs[row].params.stop_token_ids) | ({*self.eos_token_ids} if not reqs[row].params.ignore_eos else set())
                for tid in ids:
                    if 0 <= tid < vocab:
                        b.banned_token_mask[row, tid] = True
            for row in constrained:
                b.banned_token_mask[row] |= ~reqs[row].structured_output.allowed_mask(vocab).to(dev)
        wanted = [p.logprobs for p in ps if p.logprobs is not None]
        b.num_logprobs = max(wanted) if wanted else None
        return b

    # ---- one step ------------------------------------------------------------------------

    def _decode_logits(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, tuple[torch.Tensor, list[int]]]:
        """Logits and (expert choices, delta slots) of single-token decodes, in one call to the C++ step."""
        bs = self.block_size
        reqs = [c.request for c in chunks]
        ids = torch.tensor([r.all_token_ids[c.start] for r, c in zip(reqs, chunks)])
        positions = torch.tensor([c.start for c in chunks])
        slots = torch.tensor([r.block_ids[c.start // bs] * bs + c.start % bs for r, c in zip(reqs, chunks)])
        width = max(len(r.block_ids) for r in reqs)
        tables = torch.tensor([r.block_ids + [0] * (width - len(r.block_ids)) for r in reqs])
        deltas = DeltaBatch.from_runs([(r.delta_slot, 1) for r in reqs])
        logits, choices = self.decode_model.forward(ids, positions, self.kv_caches, slots, tables, bs, deltas.slots)
        return logits, (choices, deltas.owners)

    def _model_logits(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor | None, list[Request], tuple | None, dict[str, PromptScores]]:
        """Logits of the sampling rows of ``chunks`` through the PyTorch model, the layers'
        (expert choices, delta slots), and the prompt scores of requests that want them."""
        input_ids, positions, meta, sample_rows = self.prepare(chunks)
        deltas = DeltaBatch.from_runs([(c.request.delta_slot, c.num_new_tokens) for c in chunks], self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, deltas)
        reqs = [c.request for c in chunks if c.samples]
        per_layer = [layer.mlp.last_topk for layer in self.model.layers]
        for layer in self.model.layers:
            object.__setattr__(layer.mlp, "last_topk", None)  # plain attribute: skip nn.Module's hook
        choices = (torch.stack(per_layer), deltas.owners) if all(c is not None for c in per_layer) else None
        scores = self._prompt_scores(chunks, hidden)
        return (self.model.compute_logits(hidden[sample_rows]) if reqs else None), reqs, choices, scores

    def _prompt_scores(self, chunks: list[ScheduledChunk], hidden: torch.Tensor) -> dict[str, PromptScores]:
        """For requests asking for prompt_logprobs: the logprob, rank and top alternatives of each
        prompt token that a position of this step predicts.  Positions a recompute (after
        preemption) revisits were scored before and are skipped."""
        out: dict[str, PromptScores] = {}
        row = 0
        for c in chunks:
            req = c.request
            k = req.params.prompt_logprobs
            if k is not None and req.prompt_logprobs is not None:
                first = max(c.start, len(req.prompt_logprobs) - 1)
                last = min(c.start + c.num_new_tokens, req.num_prompt_tokens - 1)
                if first < last:
                    scores = PromptScores(first, [], [], [], [])
                    for p0 in range(first, last, PROMPT_SCORE_ROWS):
                        p1 = min(p0 + PROMPT_SCORE_ROWS, last)
                        logits = self.model.compute_logits(hidden[row + p0 - c.start : row + p1 - c.start]).float()
                        lp = torch.log_softmax(logits, dim=-1)
                        target = torch.tensor(req.prompt_token_ids[p0 + 1 : p1 + 1], device=lp.device)
                        chosen = lp.gather(1, target.unsqueeze(1)).squeeze(1)
                        scores.logprobs += chosen.tolist()
                        scores.ranks += ((lp > chosen.unsqueeze(1)).sum(-1) + 1).tolist()
                        if k:
                            top_lp, top_ids = lp.topk(k, dim=-1)
                            scores.top_ids += top_ids.tolist()
                            scores.top_logprobs += top_lp.tolist()
                        else:
                            scores.top_ids += [[] for _ in range(p1 - p0)]
                            scores.top_logprobs += [[] for _ in range(p1 - p0)]
                    out[req.request_id] = scores
            row += c.num_new_tokens
        return out

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Forward and sample one step.

        With the C++ step built, every decode runs through it whatever else the batch holds,
        and the prefill chunks beside it through PyTorch: a decode's numbers never depend on
        whether a neighbour's prefill shares its step (seeded requests reproduce in any mix).
        """
        cpp: list[ScheduledChunk] = []
        rest: list[ScheduledChunk] = []
        for c in out.chunks:
            (cpp if self.decode_model is not None and _is_cpp_decode(c) else rest).append(c)
        logits: list[torch.Tensor] = []
        reqs: list[Request] = []
        choices: list[tuple[torch.Tensor, list[int]]] = []
        scores: dict[str, PromptScores] = {}
        if cpp:
            decode_logits, decode_choices = self._decode_logits(cpp)
            logits.append(decode_logits)
            reqs.extend(c.request for c in cpp)
            choices.append(decode_choices)
        if rest:
            model_logits, model_reqs, model_choices, scores = self._model_logits(rest)
            if model_logits is not None:
                logits.append(model_logits)
                reqs.extend(model_reqs)
            if model_choices is not None:
                choices.append(model_choices)
        if not reqs:
            return StepResult([], SamplerOutput(torch.empty(0, dtype=torch.long)), choices, scores)
        batch = logits[0] if len(logits) == 1 else torch.cat(logits)
        return StepResult(reqs, sample(batch, self.sampling_batch(reqs)), choices, scores)


def _is_cpp_decode(chunk: ScheduledChunk) -> bool:
    """One new token after cached context that samples: what the C++ step computes."""
    return chunk.num_new_tokens == 1 and chunk.start > 0 and chunk.samples
