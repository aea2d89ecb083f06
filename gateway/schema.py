"""The OpenAPI description of the routes served in front of FastAPI (the hot path).

The two OpenAI routes do not go through FastAPI (see app.py), so FastAPI cannot
describe them; these models do, for /openapi.json and /docs. They accept extra
fields, as the OpenAI API does: the gateway reads `model` and `stream`, and the
engine validates the rest.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="A served model name or alias (see /v1/models).")
    stream: bool = Field(False, description="Answer as server-sent events.")
    max_tokens: int | None = Field(None, ge=1, description="At most the gateway's limit.")


class ChatCompletionRequest(OpenAIRequest):
    messages: list[dict[str, Any]] = Field(description="The conversation so far.")


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="The prompt.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS = {
    "400": "Malformed JSON, a missing or invalid field",
    "401": "Missing or wrong API key",
    "403": "The key may not use this model",
    "404": "Unknown model",
    "413": "Request body too large",
    "429": "Over the key's requests or tokens per minute (see Retry-After)",
    "502": "Every worker tried failed",
    "503": "No healthy worker for the model",
    "504": "No answer within the request timeout",
}


def _operation(summary: str, request: type[BaseModel]) -> dict[str, Any]:
    error = {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    }
    responses: dict[str, Any] = {
        "200": {
            "description": "The engine's answer, unchanged (server-sent events when streaming).",
            "content": {"application/json": {}, "text/event-stream": {}},
        }
    }
    responses.update({code: {"description": text, **error} for code, text in _ERRORS.items()})
    return {
        "post": {
            "summary": summary,
            "operationId": summary.lower().replace(" ", "_"),
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{request.__name__}"}
                    }
                },
            },
            "responses": responses,
            "security": [{"bearer": []}, {}],
        }
    }


def install_openapi(api: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for model in (ChatCompletionRequest, CompletionRequest, ErrorResponse):
                defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(defs.pop("$defs", {}))
                schemas[model.__name__] = defs
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["paths"]["/v1/chat/completions"] = _operation(
                "Create chat completion", ChatCompletionRequest
            )
            schema["paths"]["/v1/completions"] = _operation("Create completion", CompletionRequest)
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
