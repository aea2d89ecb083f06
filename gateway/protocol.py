"""The request contract of the routes the gateway proxies, in one place.

Every route is addressed by the request's ``model`` (required everywhere, even
where vLLM takes a default). The hot path reads a JSON request with
:func:`parse_request`, which checks by hand (cheap: one ``orjson.loads``, a few
``isinstance``) exactly what the pydantic models below describe for
/openapi.json: ``model``, the endpoint's required field, and the type of every
field the gateway itself reads (``stream``, ``stream_options``, the output-length
caps). Which fields those are is read from each endpoint's model, so the two
cannot drift. Everything else is the engine's to validate: the models accept
extra fields, as the APIs grow. tests/gateway/test_protocol.py shows with
hypothesis that the parser and the models accept and refuse the same bodies.
Audio uploads are multipart forms (gateway/multipart.py): there ``model`` is a
form field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from fleetserve.errors import OpenAIError
from fleetserve.protocol import ROUTED_PATHS
from gateway import multipart

#: The fields a client may use to cap the answer's length; each must be a positive integer,
#: at most the gateway's ``max_tokens_limit``.
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class Api(StrEnum):
    """Whose API a route belongs to: the gateway answers its own errors in that API's format."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class RoutedRequest(BaseModel):
    """What every routed request carries."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: StrictStr = Field(
        min_length=1, description="A served model name or alias (see /v1/models)."
    )


class StreamingRequest(RoutedRequest):
    stream: StrictBool | None = Field(None, description="Answer as server-sent events.")


class OpenAIRequest(StreamingRequest):
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


class ResponsesRequest(StreamingRequest):
    max_output_tokens: StrictInt | None = Field(
        None, ge=1, description="At most the gateway's limit."
    )


class MessagesRequest(StreamingRequest):
    """Anthropic's Messages API."""

    max_tokens: StrictInt | None = Field(None, ge=1, description="At most the gateway's limit.")


class AudioRequest(BaseModel):
    """A multipart form (the file and the engine's other fields besides these)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="A served model name or alias.")
    file: bytes = Field(description="The audio file (up to 25 MB).")
    stream: bool | None = Field(None, description="Answer as server-sent events.")


@dataclass(frozen=True)
class Endpoint:
    """A route the hot path serves: what a request to it must carry, and its description."""

    path: str
    schema: type[BaseModel]
    summary: str
    #: The field every request must have (besides ``model``), and its JSON types.
    required: str | None = None
    required_types: tuple[type, ...] = ()
    api: Api = Api.OPENAI
    #: A multipart form (audio), not a JSON body.
    multipart: bool = False
    #: Streams carry usage when asked for with ``stream_options.include_usage`` (chat and
    #: completions; the other APIs put it in their last events anyway).
    stream_usage_option: bool = False
    #: Read from ``schema``: does the route stream, and the length caps it has.
    streams: bool = field(init=False)
    limit_fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        fields = self.schema.model_fields
        object.__setattr__(self, "streams", "stream" in fields)
        object.__setattr__(self, "limit_fields", tuple(f for f in MAX_TOKENS_FIELDS if f in fields))


ENDPOINTS = {
    endpoint.path: endpoint
    for endpoint in (
        Endpoint(
            "/v1/chat/completions",
            ChatCompletionRequest,
            "Create chat completion",
            "messages",
            (list,),
            stream_usage_option=True,
        ),
        Endpoint(
            "/v1/completions",
            CompletionRequest,
            "Create completion",
            "prompt",
            (str, list),
            stream_usage_option=True,
        ),
        Endpoint("/v1/responses", ResponsesRequest, "Create response (Responses API)"),
        Endpoint("/v1/embeddings", RoutedRequest, "Create embeddings"),
        Endpoint("/v1/messages", MessagesRequest, "Create message (Anthropic)", api=Api.ANTHROPIC),
        Endpoint(
            "/v1/messages/count_tokens",
            RoutedRequest,
            "Count message tokens (Anthropic)",
            api=Api.ANTHROPIC,
        ),
        Endpoint("/v1/rerank", RoutedRequest, "Rerank documents"),
        Endpoint("/v2/rerank", RoutedRequest, "Rerank documents (v2)"),
        Endpoint("/v1/score", RoutedRequest, "Score text pairs"),
        Endpoint("/tokenize", RoutedRequest, "Tokenize"),
        Endpoint("/detokenize", RoutedRequest, "Detokenize"),
        Endpoint("/pooling", RoutedRequest, "Pooling"),
        Endpoint("/classify", RoutedRequest, "Classify"),
        Endpoint("/v1/audio/transcriptions", AudioRequest, "Create transcription", multipart=True),
        Endpoint("/v1/audio/translations", AudioRequest, "Create translation", multipart=True),
    )
}
assert set(ENDPOINTS) == set(ROUTED_PATHS), "one list of routed paths (fleetserve/protocol.py)"

#: Routes about a stored response (Responses API), by the id in the path: retrieve
#: (GET /v1/responses/{id}) and cancel (POST /v1/responses/{id}/cancel).
RESPONSES_PREFIX = "/v1/responses/"


@dataclass(slots=True)
class ParsedRequest:
    model: str
    stream: bool
    #: The JSON body, parsed (a form: its text fields).
    payload: dict[str, Any]
    #: The boundary of a multipart form; None for JSON.
    boundary: bytes | None = None

    def encode(self, body: bytes, **fields: str) -> bytes:
        """The body again with ``fields`` set (a rewrite: another model, a response id)."""
        self.payload.update(fields)
        if self.boundary is None:
            return orjson.dumps(self.payload)
        for name, value in fields.items():
            body = multipart.with_field(body, self.boundary, name, value)
        return body


def _invalid_type(field: str, expected: str) -> OpenAIError:
    return OpenAIError(400, f"'{field}' must be {expected}", code="invalid_type", param=field)


def _missing_model() -> OpenAIError:
    return OpenAIError(
        400, "you must provide a model parameter", code="missing_required_parameter", param="model"
    )


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
        raise _missing_model()
    if endpoint.required is not None:
        required = payload.get(endpoint.required)
        if required is None:
            raise OpenAIError(
                400,
                f"Missing required parameter: '{endpoint.required}'.",
                code="missing_required_parameter",
                param=endpoint.required,
            )
        if not isinstance(required, endpoint.required_types):
            kinds = " or ".join(
                "a string" if t is str else "an array" for t in endpoint.required_types
            )
            raise _invalid_type(endpoint.required, kinds)
    stream = False
    if endpoint.streams:
        value = payload.get("stream")
        if value is not None and not isinstance(value, bool):
            raise _invalid_type("stream", "a boolean")
        stream = value is True
    if endpoint.stream_usage_option:
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise _invalid_type("stream_options", "an object")
    for name in endpoint.limit_fields:
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OpenAIError(
                400, f"'{name}' must be a positive integer", code="invalid_value", param=name
            )
        if max_tokens_limit is not None and value > max_tokens_limit:
            raise OpenAIError(
                400,
                f"'{name}' is {value}; this gateway allows at most {max_tokens_limit}",
                code="max_tokens_too_large",
                param=name,
            )
    return ParsedRequest(model, stream, payload)


def parse_form(body: bytes, content_type: str | None) -> ParsedRequest:
    """A multipart request (audio): its ``model`` and ``stream`` form fields; 400 if invalid."""
    boundary = multipart.boundary(content_type or "")
    if boundary is None:
        raise OpenAIError(
            400,
            "this endpoint takes a multipart/form-data body (the audio file and its fields)",
            code="invalid_content_type",
        )
    try:
        fields = multipart.text_fields(body, boundary, ("model", "stream"))
    except ValueError as exc:
        raise OpenAIError(400, f"invalid multipart body: {exc}", code="invalid_body") from None
    model = fields.get("model")
    if not model:
        raise _missing_model()
    stream = fields.get("stream", "false").strip().lower()
    if stream not in ("true", "false"):
        raise _invalid_type("stream", "true or false")
    return ParsedRequest(model, stream == "true", dict(fields), boundary)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: str = "error"
    error: AnthropicErrorDetail


#: What the gateway itself answers besides the engine's own answer (every endpoint).
ERRORS = {
    "400": "Malformed body, a missing or invalid field",
    "401": "Missing or wrong API key",
    "403": "The key may not use this model",
    "404": "Unknown model, or a model that does not serve this endpoint",
    "413": "Request body too large",
    "429": "Over the key's requests or tokens per minute (see Retry-After)",
    "502": "Every worker tried failed",
    "503": "No healthy worker for the model",
    "504": "No answer within the request timeout",
}
