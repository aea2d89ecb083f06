"""The OpenAI request contract of the routes the gateway proxies, in one place.

The hot path reads a request with :func:`parse_request`, which checks by hand
(cheap: one ``orjson.loads``, a few ``isinstance``) exactly what the pydantic
models below describe for /openapi.json: ``model`` and the endpoint's required
field, and the type of every field the gateway itself reads (``stream``,
``stream_options``, ``max_tokens``, ``max_completion_tokens``). Everything else
is the engine's to validate: the models accept extra fields, as the OpenAI API
grows. tests/gateway/test_protocol.py shows with hypothesis that the parser and
the models accept and refuse the same bodies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from fleetserve.errors import OpenAIError

#: The fields a client may use to cap the answer's length; each must be a positive integer.
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: StrictStr = Field(
        min_length=1, description="A served model name or alias (see /v1/models)."
    )
    stream: StrictBool | None = Field(None, description="Answer as server-sent events.")
    stream_options: dict[str, Any] | None = Field(
        None, description="For streams: include_usage asks for a usage event at the end."
    )
    max_tokens: StrictInt | None = Field(None, ge=1, description="At most the gateway's limit.")
    max_completion_tokens: StrictInt | None = Field(
        None, ge=1, description="At most the gateway's limit."
    )


class ChatCompletionRequest(OpenAIRequest):
    messages: list[Any] = Field(description="The conversation so far.")


class CompletionRequest(OpenAIRequest):
    prompt: StrictStr | list[Any] = Field(
        description="The prompt: text, or a list of texts or of token ids."
    )


@dataclass(frozen=True)
class Endpoint:
    """A route the hot path serves: what a request to it must carry, and its description."""

    path: str
    #: The field every request must have (besides ``model``), and its JSON types.
    required: str
    required_types: tuple[type, ...]
    schema: type[OpenAIRequest]
    summary: str


ENDPOINTS = {
    endpoint.path: endpoint
    for endpoint in (
        Endpoint(
            "/v1/chat/completions",
            "messages",
            (list,),
            ChatCompletionRequest,
            "Create chat completion",
        ),
        Endpoint("/v1/completions", "prompt", (str, list), CompletionRequest, "Create completion"),
    )
}


@dataclass(slots=True)
class ParsedRequest:
    model: str
    stream: bool
    payload: dict[str, Any]


def _invalid_type(field: str, expected: str) -> OpenAIError:
    return OpenAIError(400, f"'{field}' must be {expected}", code="invalid_type", param=field)


def parse_request(body: bytes, endpoint: Endpoint, max_tokens_limit: int | None) -> ParsedRequest:
    """Read what routing needs and check what the gateway uses; OpenAIError (400) if invalid."""
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(
            400, f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(
            400,
            "you must provide a model parameter",
            code="missing_required_parameter",
            param="model",
        )
    required = payload.get(endpoint.required)
    if required is None:
        raise OpenAIError(
            400,
            f"Missing required parameter: '{endpoint.required}'.",
            code="missing_required_parameter",
            param=endpoint.required,
        )
    if not isinstance(required, endpoint.required_types):
        kinds = " or ".join("a string" if t is str else "an array" for t in endpoint.required_types)
        raise _invalid_type(endpoint.required, kinds)
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid_type("stream", "a boolean")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid_type("stream_options", "an object")
    for field in MAX_TOKENS_FIELDS:
        value = payload.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OpenAIError(
                400, f"'{field}' must be a positive integer", code="invalid_value", param=field
            )
        if max_tokens_limit is not None and value > max_tokens_limit:
            raise OpenAIError(
                400,
                f"'{field}' is {value}; this gateway allows at most {max_tokens_limit}",
                code="max_tokens_too_large",
                param=field,
            )
    return ParsedRequest(model, stream is True, payload)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


#: What the gateway itself answers besides the engine's own answer (every endpoint).
ERRORS = {
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
