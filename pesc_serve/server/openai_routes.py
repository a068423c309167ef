"""Route bindings of the OpenAI API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from pesc_serve.server.chat_completions import create_chat_completion
from pesc_serve.server.completions import create_completion
from pesc_serve.server.protocol import ChatCompletionRequest, CompletionRequest
from pesc_serve.server.serving import OpenAIServing


def build_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Any:
        return await create_chat_completion(serving, body, raw)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Any:
        return await create_completion(serving, body, raw)

    @router.get("/v1/models")
    async def models() -> dict:
        return serving.models()

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        return serving.model_card(model_id)

    return router
