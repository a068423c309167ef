"""``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's endpoints and bodies).

Mounted only with ``--enable-runtime-adapters`` (else 404), behind ``--api-key`` like all of
/v1.  A load reads and checks the delta off the event loop and off the engine thread, so
running requests keep stepping; only the install (swapping table entries) runs on the
engine thread between two steps.  A bad delta is a 400 naming the file and the problem.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from pesc_serve.deltas.delta import find_delta
from pesc_serve.deltas.served_models import UnknownModelError
from pesc_serve.registry import resolve_delta_path
from pesc_serve.server.errors import APIError
from pesc_serve.server.serving import OpenAIServing


async def _body(raw: Request, fields: tuple[str, ...]) -> dict[str, str]:
    try:
        body = await raw.json()
    except Exception:
        raise APIError(400, "the body must be a JSON object", code="invalid_request_error") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_request_error")
    for name in fields:
        value = body.get(name)
        if not isinstance(value, str) or not value.strip():
            raise APIError(400, f"{name} must be a non-empty string", name, "invalid_value")
    return body


def build_adapter_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()
    engine = serving.engine

    @router.post("/v1/load_lora_adapter")
    async def load_adapter(raw: Request) -> Any:
        body = await _body(raw, ("lora_name", "lora_path"))
        name, path = body["lora_name"].strip(), body["lora_path"].strip()
        models = engine.engine.models
        if name in models.models and not models.models[name].unloading:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name", "invalid_value")
        try:
            source = find_delta(name, resolve_delta_path(path))
            delta = await asyncio.to_thread(models.read, source)
        except ValueError as exc:
            raise APIError(400, str(exc), "lora_path", "invalid_value") from None
        try:
            await engine.call(lambda e: e.models.add(source, delta))
        except ValueError as exc:  # registered meanwhile by a concurrent load
            raise APIError(400, str(exc), "lora_name", "invalid_value") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_adapter(raw: Request) -> Any:
        body = await _body(raw, ("lora_name",))
        name = body["lora_name"].strip()
        try:
            await engine.call(lambda e: e.models.remove(name))
        except UnknownModelError as exc:
            raise APIError(404, str(exc), "lora_name", "model_not_found") from None
        except ValueError as exc:
            raise APIError(400, str(exc), "lora_name", "invalid_value") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return router
