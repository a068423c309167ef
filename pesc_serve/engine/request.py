"""Requests as the engine sees them: sampling parameters, per-request state, outputs.

``SamplingParams`` is the contract between the HTTP layer and the engine; ``RequestOutput``
is what flows back, one delta per engine step (text already cleaned of stop strings).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestError(ValueError):
    """A request the engine cannot serve; ``param`` names the field at fault (the HTTP 400's)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # the client went away or the request timed out
    ERROR = "error"  # the engine step failed for this request


@dataclass
class SamplingParams:
    """Per-request decoding settings; :meth:`validate` raises ``ValueError`` naming the field."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus k alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    json_mode: bool = False  # constrain the output to a JSON object (or to ``json_schema``)
    json_schema: dict | None = None
    grammar: str | None = None  # an llguidance (Lark) grammar the output must match (e.g. tool-call blocks)
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's logprob plus k alternatives

    MAX_LOGPROBS = 20

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(name: str, why: str) -> RequestError:
            return RequestError(f"{name} {why}", name if name.isidentifier() else None)

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise bad("max_tokens", f"must be at least 0 (0: score the prompt only), got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", f"must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise bad("top_k", f"must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            raise bad("top_logprobs", f"must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS:
            raise bad("prompt_logprobs", f"must be in [0, {self.MAX_LOGPROBS}], got {self.prompt_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "strings must be non-empty")
        if len(self.stop) > 16:
            raise bad("stop", f"accepts at most 16 sequences, got {len(self.stop)}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise bad("seed", "must fit in a signed 64-bit integer")
        if vocab_size is not None:
            for tid in list(self.stop_token_ids) + list(self.logit_bias):
                if not 0 <= tid < vocab_size:
                    raise bad("token id", f"{tid} is outside the vocabulary (size {vocab_size})")
        for tid, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", f"values must be in [-100, 100], got {bias} for token {tid}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # 1 + the number of tokens the model found likelier (prompt logprobs)


@dataclass
class RequestOutput:
    """One delta of a request's generation, as produced by an engine step."""

    request_id: str
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    # With prompt_logprobs: entry j scores prompt token j (entry 0, with no context, is None);
    # sent once, on the request's first output.
    prompt_logprobs: list[TokenLogprob | None] | None = None


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """Engine-side state of one sequence: tokens, progress, KV blocks and finish state."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_keys: list[tuple] = field(default_factory=list)  # prefix-cache keys of full blocks
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    structured_output: Any = None  # an OutputMatcher for response_format requests
    model: str = ""  # the served model name it asked for
    delta_slot: int | None = 0  # the slot of that model's delta (None: not resident yet, it waits)
    cache_salt: str = ""  # the model's prefix-cache namespace (KV is never shared across models)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled as prefill goes, with prompt_logprobs

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
