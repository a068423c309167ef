"""The engine: ``step()`` = schedule -> execute -> update requests -> outputs.

:class:`LLMEngine` is synchronous (offline use and tests).  A failing model step fails
only the requests in that step; the engine stays usable.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass

import torch

from pesc_serve.config import EngineConfig, resolve_kv_cache_dtype
from pesc_serve.deltas.delta import Delta, DeltaSource
from pesc_serve.deltas.served_models import ServedModel, ServedModels
from pesc_serve.deltas.table import DeltaTable
from pesc_serve.engine.detokenizer import IncrementalDetokenizer
from pesc_serve.engine.expert_load import ExpertLoad
from pesc_serve.engine.kv_cache import KVCacheManager
from pesc_serve.engine.model_runner import ModelRunner, PromptScores, kv_bytes_per_token
from pesc_serve.engine.request import FinishReason, Request, RequestError, RequestOutput, SamplingParams, TokenLogprob
from pesc_serve.engine.scheduler import Scheduler
from pesc_serve.engine.structured_output import StructuredOutputFactory
from pesc_serve.kernels.cpu_kernels import try_build
from pesc_serve.models.loader import LoadedModel, load_delta

logger = logging.getLogger(__name__)

DEFAULT_KV_CACHE_GB_CPU = 4.0
GPU_MEMORY_FRACTION = 0.9
LOAD_WAIT_S = 0.05  # an idle step waits this long for a delta being read (instead of spinning)
UNLIMITED_SLOTS = 1 << 16  # --max-loaded-adapters unset: every registered delta stays resident


@dataclass
class _Tracked:
    """Engine-side companions of a request: its detokenizer and output bookkeeping."""

    request: Request
    detok: IncrementalDetokenizer
    error: str | None = None
    sent_prompt_logprobs: bool = False


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int


def plan_kv_cache(loaded: LoadedModel, cfg: EngineConfig, kv_dtype: torch.dtype) -> tuple[int, int]:
    """(num_blocks, max_model_len) from the memory budget and the model's context length."""
    per_token = kv_bytes_per_token(loaded.config, kv_dtype)
    if cfg.kv_cache_memory_gb is not None:
        budget = cfg.kv_cache_memory_gb * 1024**3
    elif loaded.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(loaded.device)
        budget = max(free - (1 - GPU_MEMORY_FRACTION) * total, 0)
    else:
        budget = DEFAULT_KV_CACHE_GB_CPU * 1024**3
    max_len = cfg.max_model_len or loaded.config.max_position_embeddings
    if cfg.max_model_len and cfg.max_model_len > loaded.config.max_position_embeddings:
        raise ValueError(
            f"--max-model-len {cfg.max_model_len} exceeds the model's context length "
            f"({loaded.config.max_position_embeddings})"
        )
    wanted_tokens = max_len * cfg.max_num_seqs
    tokens = int(min(budget // per_token, wanted_tokens))
    num_blocks = tokens // cfg.block_size
    if num_blocks * cfg.block_size < max_len:
        if cfg.max_model_len:
            raise ValueError(
                f"the KV-cache budget holds {num_blocks * cfg.block_size} tokens, fewer than "
                f"--max-model-len {max_len}; raise --kv-cache-memory or lower --max-model-len"
            )
        max_len = num_blocks * cfg.block_size
    if num_blocks < 1:
        raise ValueError("the KV-cache budget is too small for a single block")
    return num_blocks, max_len


def eos_token_ids(loaded: LoadedModel, tokenizer) -> tuple[int, ...]:
    ids = set(loaded.config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


class LLMEngine:
    """Continuous-batching engine over one loaded base and the deltas served beside it.

    ``models`` maps the served names to deltas; each request runs its own model's delta, in
    batches that mix models freely.
    """

    def __init__(self, loaded: LoadedModel, tokenizer, cfg: EngineConfig, model_name: str | None = None) -> None:
        self.loaded = loaded
        self.tokenizer = tokenizer
        self.config = cfg
        kv_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, loaded.dtype, loaded.device)
        self.num_blocks, self.max_model_len = plan_kv_cache(loaded, cfg, kv_dtype)
        self.eos_token_ids = eos_token_ids(loaded, tokenizer)
        self.kv = KVCacheManager(self.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        kernels = try_build(loaded.model, cfg.cpu_kernels, kv_dtype, loaded.quantization.amx_from_rows) \
            if loaded.device.type == "cpu" else None
        self.runner = ModelRunner(
            loaded.model, self.num_blocks, cfg.block_size, loaded.device, kv_dtype, self.eos_token_ids,
            decode_model=kernels.decode_model if kernels is not None else None,
        )
        slots = 1 + (cfg.max_loaded_adapters if cfg.max_loaded_adapters is not None else UNLIMITED_SLOTS)
        self.deltas = DeltaTable(loaded.model, kernels, slots)
        self._kernels = kernels
        self.models = ServedModels(model_name or loaded.source.name, loaded.delta, self.deltas, self._read_delta)
        self._tracked: dict[str, _Tracked] = {}
        self._model_of: dict[str, ServedModel] = {}
        self.structured_output = StructuredOutputFactory(tokenizer, self.eos_token_ids)
        self.expert_load = ExpertLoad(loaded.config.num_layers, self._models_with_experts)
        torch.manual_seed(cfg.seed)

    @property
    def vocab_size(self) -> int:
        return self.loaded.config.vocab_size

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a prompt the engine cannot serve (the HTTP layer maps it to 400)."""
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", "prompt")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})", "prompt")
        n = len(prompt_token_ids)
        if n > self.max_model_len or (n == self.max_model_len and params.max_tokens != 0):
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                f"has {n} tokens, which leaves no room for a completion. Please shorten the prompt.",
                "prompt",
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion). "
                f"Please reduce the prompt or max_tokens.",
                "max_tokens",
            )
        params.validate(self.vocab_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    model: str | None = None) -> None:
        """Queue a request for the served ``model`` (None: the --model); raises UnknownModelError
        for a name not served, ValueError for a request that cannot be served."""
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        served = self.models.get(model)
        self.validate_prompt(prompt_token_ids, params)
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = min(params.max_tokens, room) if params.max_tokens is not None else room
        req = Request(request_id, list(prompt_token_ids), params, max_tokens, model=served.name,
                      cache_salt=served.cache_salt)
        if params.grammar is not None:
            req.structured_output = self.structured_output.matcher(grammar=params.grammar)
        elif params.json_mode:
            req.structured_output = self.structured_output.matcher(params.json_schema)
        detok = IncrementalDetokenizer(
            self.tokenizer, req.prompt_token_ids, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
        )
        self._tracked[request_id] = _Tracked(req, detok)
        self.models.acquire(served)
        self._model_of[request_id] = served
        req.delta_slot = served.slot
        self.scheduler.add_request(req)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return None
        self._finish(tracked.request, FinishReason.ABORT)
        return self._output(tracked, [], [], finished=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(
            self.scheduler.num_running,
            self.scheduler.num_waiting,
            self.kv.usage,
            self.scheduler.num_preemptions,
            self.kv.num_queries,
            self.kv.num_hits,
        )

    def step(self) -> list[RequestOutput]:
        """One engine iteration.  A failure is contained where it happens: in scheduling or the
        forward pass and sampling it fails the step's requests, in one request's output
        processing (detokenizer, structured output) only that request, in the expert-load
        metric nobody; the engine keeps serving."""
        outputs = self._place_loaded_models()
        try:
            out = self.scheduler.schedule()
        except Exception as exc:
            logger.exception("scheduling failed; failing every unfinished request")
            return outputs + self._fail([t.request for t in list(self._tracked.values())], "scheduling", exc)
        if out.is_empty:
            pending = self.models.pending_futures()
            if pending:  # requests wait for a delta being read: wait for it, do not spin
                concurrent.futures.wait(pending, LOAD_WAIT_S, concurrent.futures.FIRST_COMPLETED)
            return outputs
        try:
            result = self.runner.execute(out)
            self.scheduler.advance(out)
            sampled = result.sampled
            token_ids = sampled.token_ids.tolist()
            chosen_lp = sampled.logprobs.tolist() if sampled.logprobs is not None else None
            top_ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
            top_lp = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        except Exception as exc:
            logger.exception("engine step failed; failing %d request(s)", len(out.chunks))
            return outputs + self._fail([c.request for c in out.chunks], "engine step", exc)
        self._record_expert_load(result.expert_choices)
        for rid, scores in result.prompt_logprobs.items():
            tracked = self._tracked.get(rid)
            if tracked is not None:
                _add_prompt_scores(tracked.request, scores)
        for row, req in enumerate(result.requests):
            tracked = self._tracked.get(req.request_id)
            if tracked is None:
                continue
            try:
                if req.max_tokens == 0:  # max_tokens 0: the prompt was only to be scored
                    self._finish(req, FinishReason.LENGTH)
                    outputs.append(self._output(tracked, [], [], finished=True))
                    continue
                token = token_ids[row]
                req.output_token_ids.append(token)
                logprobs = []
                if req.params.logprobs is not None and chosen_lp is not None:
                    k = req.params.logprobs
                    alts = list(zip(top_ids[row][:k], top_lp[row][:k])) if top_ids is not None and k else []
                    logprobs.append(TokenLogprob(token, chosen_lp[row], alts))
                self._check_finish(tracked, token)
                outputs.append(self._output(tracked, [token], logprobs, finished=req.is_finished))
            except Exception as exc:
                logger.exception("processing the output of request %s failed", req.request_id)
                outputs.extend(self._fail([req], "output processing", exc))
        return outputs

    def _place_loaded_models(self) -> list[RequestOutput]:
        """Give the waiting requests of deltas that became resident their slot; fail those of a
        delta that could not be read."""
        outputs: list[RequestOutput] = []
        for model, error in self.models.poll():
            waiting = [t.request for t in self._tracked.values() if t.request.model == model.name
                       and t.request.delta_slot is None]
            if error is None:
                for req in waiting:
                    req.delta_slot = model.slot
            else:
                logger.error("could not load delta %s: %s", model.name, error)
                outputs.extend(self._fail(waiting, f"loading model {model.name}", RuntimeError(error)))
        return outputs

    def _read_delta(self, source: DeltaSource) -> Delta:
        """Read, check and pack a delta: safe off the engine thread (it touches no table)."""
        delta = load_delta(self.loaded, source)
        if self._kernels is not None:
            self._kernels.pack(delta)
        return delta

    def _models_with_experts(self) -> list[tuple[str, int]]:
        return [(m.name, m.delta.num_experts) for m in self.models.listed() if m.delta is not None and m.delta.experts]

    def _slot_owner(self, slot: int) -> tuple[str, int] | None:
        for model in self.models.models.values():
            if model.slot == slot and model.delta is not None and model.delta.experts:
                return model.name, model.delta.num_experts
        return None

    def _record_expert_load(self, choices) -> None:
        """A metric: its failure is logged, never visited on a request."""
        try:
            self.expert_load.record(choices, self._slot_owner)
        except Exception:
            logger.exception("recording the expert load failed (metric only; requests go on)")

    def _check_finish(self, tracked: _Tracked, token: int) -> None:
        req, params = tracked.request, tracked.request.params
        n_out = len(req.output_token_ids)
        stop_str = tracked.detok.add_token(token, check_stop=n_out >= params.min_tokens)
        matcher = req.structured_output
        if matcher is not None:
            if not matcher.accept(token):
                tracked.error = f"response_format: the output left the grammar ({matcher.error})"
                return self._finish(req, FinishReason.ERROR)
            if matcher.is_terminated:  # the JSON value is complete, whatever min_tokens says
                return self._finish(req, FinishReason.STOP)
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return self._finish(req, FinishReason.STOP, token)
            if token in params.stop_token_ids:
                return self._finish(req, FinishReason.STOP, token)
            if stop_str is not None:
                return self._finish(req, FinishReason.STOP, stop_str)
        if n_out >= req.max_tokens or req.num_tokens >= self.max_model_len:
            self._finish(req, FinishReason.LENGTH)

    def _finish(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        self.scheduler.finish(req, reason, stop_reason)
        self.runner.release(req.request_id)
        served = self._model_of.pop(req.request_id, None)
        if served is not None:
            self.models.release(served)

    def _output(
        self, tracked: _Tracked, new_ids: list[int], logprobs: list[TokenLogprob], finished: bool
    ) -> RequestOutput:
        req = tracked.request
        if finished:
            self._tracked.pop(req.request_id, None)
        prompt_logprobs = None
        if req.prompt_logprobs is not None and not tracked.sent_prompt_logprobs:
            prompt_logprobs, tracked.sent_prompt_logprobs = req.prompt_logprobs, True
        return RequestOutput(
            request_id=req.request_id,
            new_text=tracked.detok.pop_delta(finished),
            new_token_ids=new_ids,
            logprobs=logprobs,
            finished=finished,
            finish_reason=req.finish_reason if finished else None,
            stop_reason=req.stop_reason if finished else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
            error=tracked.error if finished else None,
            prompt_logprobs=prompt_logprobs,
        )

    def _fail(self, requests: list[Request], stage: str, exc: Exception) -> list[RequestOutput]:
        """Finish ``requests`` with an error naming the stage; what failed may be the bookkeeping
        itself, so the output is built without the detokenizer and freeing is best effort."""
        outputs = []
        for req in requests:
            tracked = self._tracked.pop(req.request_id, None)
            if tracked is None:
                continue
            try:
                if not req.is_finished:
                    self._finish(req, FinishReason.ERROR)
            except Exception:
                logger.exception("could not release request %s cleanly", req.request_id)
                req.finish(FinishReason.ERROR)
            outputs.append(
                RequestOutput(
                    request_id=req.request_id,
                    finished=True,
                    finish_reason=FinishReason.ERROR,
                    num_prompt_tokens=req.num_prompt_tokens,
                    num_output_tokens=len(req.output_token_ids),
                    num_cached_tokens=req.num_cached_tokens,
                    error=f"{stage} failed: {type(exc).__name__}: {exc}",
                )
            )
        return outputs


def _add_prompt_scores(req: Request, scores: PromptScores) -> None:
    """Append a step's prompt-token scores (prompt_logprobs) to the request's list."""
    k = req.params.prompt_logprobs or 0
    for i, (lp, rank) in enumerate(zip(scores.logprobs, scores.ranks)):
        token = req.prompt_token_ids[scores.first + 1 + i]
        top = list(zip(scores.top_ids[i][:k], scores.top_logprobs[i][:k]))
        req.prompt_logprobs.append(TokenLogprob(token, lp, top, rank))
