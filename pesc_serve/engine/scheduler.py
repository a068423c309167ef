"""Token-budget scheduler: decodes and chunked prefills share one budget per step.

There are no prefill and decode phases: each request's ``num_computed_tokens`` catches up
with its ``num_tokens`` under ``max_num_batched_tokens`` per step (vLLM v1's idea), which
gives chunked prefill and prefix caching for free.  Running requests go first, in arrival
order; waiting ones are admitted FCFS while the budget, ``max_num_seqs`` and free KV blocks
allow.  When blocks run out, the most recently admitted request is preempted and later
recomputed (its generated tokens are kept).  Pure Python: testable without a model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pesc_serve.engine.kv_cache import KVCacheManager
from pesc_serve.engine.request import FinishReason, Request, RequestStatus


@dataclass
class ScheduledChunk:
    """``num_new_tokens`` of ``request`` computed this step, from ``start`` on."""

    request: Request
    start: int
    num_new_tokens: int
    samples: bool = field(init=False)  # reaches the end of the known tokens: sample the next one

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, num_new):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new))
                budget -= num_new
                i += 1
                continue
            break
        if not out.preempted:
            budget = self._admit(out, budget)
        # Single-token chunks with context first: the model runner batches them in one call.
        out.chunks.sort(key=lambda c: not (c.num_new_tokens == 1 and c.start > 0))
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        """FCFS over the requests whose model is resident; those waiting for their delta to load
        keep their place without holding up the others."""
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.delta_slot is None:
                skipped.append(self.waiting.popleft())
                continue
            # Scoring the prompt needs every prompt position's logits: no cached prefix then.
            wants_cache = req.num_computed_tokens == 0 and req.params.prompt_logprobs is None
            cached = self.kv.find_cached_prefix(req) if wants_cache else []
            num_cached = len(cached) * self.kv.block_size
            num_new = min(req.num_tokens - max(num_cached, req.num_computed_tokens), budget)
            if not self.kv.allocate(req, num_new, cached):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Free a running request's blocks; it restarts (recomputes) when admitted again."""
        self.running.remove(req)
        self.kv.free_request(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def advance(self, out: SchedulerOutput) -> None:
        """Record that the scheduled chunks were computed and cache their full blocks."""
        for chunk in out.chunks:
            chunk.request.num_computed_tokens = chunk.start + chunk.num_new_tokens
            self.kv.cache_full_blocks(chunk.request)

    def finish(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """Remove a request wherever it is and release its KV blocks."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free_request(req)
        req.finish(reason, stop_reason)
