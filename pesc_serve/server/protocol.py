"""Pydantic models of the OpenAI request bodies we accept, and their mapping to SamplingParams.

Unknown fields are accepted and ignored (clients send vendor extras); every known field is
validated here so a bad value becomes an HTTP 400 naming the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pesc_serve.engine.request import SamplingParams
from pesc_serve.engine.structured_output import schema_error
from pesc_serve.server.tools import ToolError, ToolPlan, parse_tools

MAX_N = 16
_TOKEN_ID = re.compile(r"-?[0-9]+")


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class JsonSchemaFormat(OpenAIModel):
    name: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (output matches the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> "ResponseFormat":
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("json_schema is required when type is 'json_schema'")
            problem = schema_error(self.json_schema.schema_)
            if problem is not None:
                raise ValueError(f"json_schema.schema cannot be used: {problem}")
        return self


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionCall(OpenAIModel):
    name: FunctionName
    arguments: str


class MessageToolCall(OpenAIModel):
    """A call in an earlier assistant turn."""

    id: Annotated[str, Field(min_length=1)]
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(OpenAIModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: FunctionName


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class SamplingFields(OpenAIModel):
    """Fields shared by chat and text completions."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    stop: Union[str, Annotated[list[str], Field(max_length=16)], None] = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] = 1.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None
    user: str | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=SamplingParams.MAX_LOGPROBS)] | None = None  # vLLM's extension

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling_params(self, max_tokens: int | None, num_logprobs: int | None,
                           prompt_logprobs: int | None = None) -> SamplingParams:
        fmt = self.response_format
        json_mode = fmt is not None and fmt.type != "text"
        json_schema = fmt.json_schema.schema_ if fmt is not None and fmt.type == "json_schema" else None
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=num_logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()},
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            json_mode=json_mode,
            json_schema=json_schema,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
        )
        params.validate()
        return params


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=SamplingParams.MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def tool_plan(self, native: bool = False) -> ToolPlan | None:
        """How this request uses tools (None: it has none); ``native``: the chat template takes
        tools itself.  Raises ToolError naming the field."""
        plan = parse_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        if plan is not None:
            plan.native = native
        if plan is not None and plan.active and self.response_format is not None and self.response_format.type != "text":
            raise ToolError("response_format cannot be combined with tools unless tool_choice is none",
                            "response_format")
        return plan

    def sampling_params(self, plan: ToolPlan | None = None) -> SamplingParams:
        """The request's sampling; offered tools constrain the reply to the tool format."""
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        num_logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self.to_sampling_params(limit, num_logprobs)
        if plan is not None and plan.active:
            if plan.native:
                params.grammar = plan.native_grammar()
            else:
                params.json_mode, params.json_schema = True, plan.output_schema()
        return params


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptType = Union[
    NonEmptyStr,
    TokenIds,
    Annotated[list[NonEmptyStr], Field(min_length=1)],
    Annotated[list[TokenIds], Field(min_length=1)],
]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0: score the prompt only (with echo)
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported by this model")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def sampling_params(self) -> SamplingParams:
        """``echo`` with ``logprobs`` scores the prompt too (with the same number of alternatives)."""
        prompt_k = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_k = max(prompt_k or 0, self.logprobs)
        return self.to_sampling_params(self.max_tokens, self.logprobs, prompt_k)

    def prompt_list(self) -> list[str | list[int]]:
        """The prompt as a batch: strings and/or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(OpenAIModel):
    """vLLM's ``POST /tokenize`` body: a completion ``prompt``, or chat ``messages`` rendered by
    the chat template first."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDefinition] | None = None  # with messages: rendered as a chat completion with them

    @model_validator(mode="after")
    def _check(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
