"""Errors: one base class, and OpenAI's error envelope produced by one function.

``{"error": {"message", "type", "param", "code"}}``: :func:`error_response` turns
any exception into it. The FastAPI apps install it as their exception handlers
(:func:`install_error_handlers`) and the gateway's hot path, which runs outside
FastAPI, calls it directly, so no handler formats an error by hand. On the routes
of Anthropic's API the same errors take Anthropic's envelope
(``{"type": "error", "error": {"type", "message"}}``), with its error types.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


# Anthropic's error types (https://docs.anthropic.com/en/api/errors); a 503 (no healthy worker)
# is what it calls "overloaded" (its own 529).
_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class FleetserveError(Exception):
    """Base of every error fleetserve raises on purpose; the CLI prints its message."""


class ConfigError(FleetserveError):
    """A configuration that cannot work; the message says what to change."""


class OpenAIError(FleetserveError):
    """An error a client sees, in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    kind = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def as_openai_error(exc: BaseException) -> OpenAIError:
    """The client-facing error for any exception; unexpected ones are logged and become 500."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), code=code)
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return OpenAIError(400, f"{param}: {first['msg']}", param=param)
    logger.error("unhandled error", exc_info=exc)
    return OpenAIError(500, "internal error", code="internal_error")


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else None)
    return {"type": "error", "error": {"type": kind or "invalid_request_error", "message": message}}


def error_response(exc: BaseException, anthropic: bool = False) -> Response:
    """The response for any exception, in OpenAI's envelope (``anthropic``: Anthropic's)."""
    error = as_openai_error(exc)
    if anthropic:
        body = orjson.dumps(anthropic_error_body(error.status, error.message))
    else:
        body = orjson.dumps(error_body(error.status, error.message, error.code, error.param))
    return Response(
        body, status_code=error.status, media_type="application/json", headers=error.headers
    )


async def _handler(_: Request, exc: Exception) -> Response:
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    for kind in (OpenAIError, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, _handler)
