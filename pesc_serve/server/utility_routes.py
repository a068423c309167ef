"""``POST /tokenize``, ``POST /detokenize`` and ``GET /version`` (vLLM's bodies).

Clients count tokens before sending (context budgeting, cost estimates) with the server's own
tokenizer and chat template, so the counts match what a completion will see.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter

from pesc_serve.server.errors import APIError
from pesc_serve.server.tools import ToolError, parse_tools
from pesc_serve.server.protocol import DetokenizeRequest, TokenizeRequest
from pesc_serve.server.serving import OpenAIServing


def package_version() -> str:
    try:
        return version("pesc-serve")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def build_utility_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        serving.check_model(body.model)
        fmt = serving.formatter
        if body.messages is not None:
            try:
                plan = parse_tools(body.tools, None, None)  # as a chat completion with these tools renders them
            except ToolError as exc:
                raise APIError(400, str(exc), exc.param, "invalid_value") from None
            if plan is not None:
                plan.native = fmt.takes_tools
            tokens = serving.chat_prompt(body.messages, body.add_generation_prompt, plan, body.chat_template_kwargs)
        else:
            tokens = fmt.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        strs = fmt.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return {"count": len(tokens), "max_model_len": serving.engine.max_model_len, "tokens": tokens,
                "token_strs": strs}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        serving.check_model(body.model)
        vocab = serving.engine.engine.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {vocab})", "tokens", "invalid_value")
        return {"prompt": serving.formatter.tokenizer.decode(body.tokens)}

    @router.get("/version")
    async def version_endpoint() -> dict:
        return {"version": package_version()}

    return router
