"""OpenAI-style error bodies and the exception handlers that produce them.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}``.  FastAPI's 422
for schema errors becomes a 400 (the OpenAI SDK raises BadRequestError for it, as with
vLLM and SGLang); nothing escapes as a bare 500 traceback.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error with an HTTP status, raised anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        return "error"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status) or _phrase(status),
            "param": param,
            "code": code if code is not None else str(status),
        }
    }


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# Pydantic puts union members and validator kinds into error locations ("str", "list[int]",
# "function-after[...]"); they are not fields the client sent.
_LOC_TAGS = re.compile(
    r"^(str|int|float|bool|none|list|dict|tuple|set|union|literal|json-or-python|lax-or-strict|tagged-union|"
    r"constrained-\w+|function-(after|before|wrap|plain))(\[.*\])?$"
)


def _field_path(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if not (isinstance(p, str) and _LOC_TAGS.match(p))]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = _field_path(tuple(first.get("loc", ())))
    kind = first.get("type")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if kind == "missing":
        if param is None:
            return "the request body is empty; expected a JSON object", None
        return f"missing required field '{param}'", param
    if kind == "model_attributes_type" and param is None:
        return "the request body must be a JSON object", None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if param is None and kind == "value_error":
        param = param_of(msg)  # a model-level check names its field first
    elif param:
        msg = f"{param}: {msg}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return msg, param


def param_of(error: str | Exception) -> str | None:
    """The field an error names: an engine RequestError's ``param``, else a plain-text message's
    first word when it is a field name ("top_p must be ...")."""
    if isinstance(error, Exception):
        if hasattr(error, "param"):
            return error.param
        error = str(error)
    first = error.split(" ", 1)[0]
    return first if first.isidentifier() else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")
