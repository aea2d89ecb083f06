"""The hot path's request parser and the pydantic models of /openapi.json are one contract.

``parse_request`` checks a body by hand (it is on every request's path); the
models in gateway/protocol.py describe the same contract to clients, for every
JSON route (chat, completions, responses, embeddings, Anthropic's messages...).
Hypothesis draws bodies mixing valid and invalid values of every field the
gateway reads on any route, extra fields, JSON that is not an object and bytes
that are not JSON, and the two must accept and refuse the same ones on each
route; the edges a type check most easily gets wrong are also tried every time,
by hand. The multipart routes (audio) are read by ``parse_form``: hypothesis
draws forms, encoded by httpx as clients do, and the parser must find what was
sent.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetserve.errors import OpenAIError
from gateway import multipart
from gateway.protocol import ENDPOINTS, MAX_TOKENS_FIELDS, parse_form, parse_request

JSON_PATHS = sorted(path for path, endpoint in ENDPOINTS.items() if not endpoint.multipart)
FORM_PATHS = sorted(path for path, endpoint in ENDPOINTS.items() if endpoint.multipart)
#: One JSON route per contract (what the parser reads and checks is the same for all of a
#: contract's routes: /v1/embeddings, /v1/rerank, /tokenize... have one), as the routes are
#: tested against their models.
CONTRACTS = sorted(
    {
        (e.schema, e.required, e.required_types, e.stream_usage_option): path
        for path, e in reversed(ENDPOINTS.items())
        if not e.multipart
    }.values()
)

# Text from a few characters that matter to a JSON encoding (quote, backslash, NUL,
# non-ASCII): every character would cost Hypothesis seconds to index on a fresh checkout, and
# the contract does not depend on which letters a name has. (A lone surrogate, which orjson
# refuses, would make most objects invalid JSON: the edges try one.)
text = st.text(alphabet='ab"\\\x00é💡', max_size=6)
# Any JSON value, integers past 64 bits included (orjson reads those as floats).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
positive_ints = st.integers(min_value=1, max_value=2**63 - 1)

#: Values each field should accept; a field may also be absent or get any JSON value.
VALID: dict[str, st.SearchStrategy[Any]] = {
    "model": text.filter(bool),
    "messages": st.lists(json_values, max_size=3),
    "prompt": text | st.lists(json_values, max_size=3),
    "stream": st.none() | st.booleans(),
    "stream_options": st.none() | st.dictionaries(text, json_values, max_size=2),
    **{field: st.none() | positive_ints for field in MAX_TOKENS_FIELDS},
}
#: Invalid values a field's type check most easily gets wrong (bools are ints in Python...).
EDGES: dict[str, list[Any]] = {
    "model": ["", 0, ["m"], None, "\ud800"],
    "messages": ["hi", {}, 0, None],
    "prompt": [0, {}, True, None],
    "stream": [0, 1, "true", []],
    "stream_options": [[], "", True, 1],
    **{field: [0, -1, True, False, 1.0, 2.5, "8", 2**64, [1]] for field in MAX_TOKENS_FIELDS},
}
ABSENT = object()
#: Extra field names, among them names pydantic gives a meaning of its own.
extra_names = text | st.sampled_from(
    ["model_config", "model_fields", "__class__", "__dict__", "__pydantic_extra__"]
)


@st.composite
def objects(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object: each field valid, absent, or any JSON value."""
    extra = st.dictionaries(extra_names.filter(lambda k: k not in VALID), json_values, max_size=2)
    payload: dict[str, Any] = draw(extra)
    # Half the objects have exactly one field off (where a check missing on one side shows),
    # the others each field with a chance of one in four (mixes of errors).
    only = draw(st.none() | st.sampled_from(list(VALID)))
    for field, valid in VALID.items():
        off = field == only if only is not None else draw(st.integers(0, 3)) == 0
        if off:
            value = draw(st.just(ABSENT) | json_values | st.sampled_from(EDGES[field]))
        else:
            value = draw(valid)
        if value is not ABSENT:
            payload[field] = value
    return payload


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()  # json, not orjson: it writes integers past 64 bits


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Mostly JSON objects (where the two can disagree), some other JSON, some not JSON."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=32))
    if kind == 1:
        return _encode(draw(json_values.filter(lambda value: not isinstance(value, dict))))
    body = _encode(draw(objects()))
    return body if kind < 8 else b" \n" + body + b" "  # whitespace around is still JSON


def _schema_refusals(body: bytes, path: str) -> set[str | None] | None:
    """The fields the pydantic model refuses in ``body`` (None for the body as a whole), or
    None if it accepts it."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {None}
    try:
        ENDPOINTS[path].schema.model_validate(payload)
    except ValidationError as exc:
        return {str(error["loc"][0]) if error["loc"] else None for error in exc.errors()}
    return None


def _assert_one_contract(path: str, body: bytes) -> None:
    refused_by_schema = _schema_refusals(body, path)
    try:
        parsed = parse_request(body, ENDPOINTS[path], max_tokens_limit=None)
    except OpenAIError as error:
        assert refused_by_schema is not None, f"only the parser refuses: {error.message}"
        assert error.status == 400
        # the parser names a field the schema refuses too (None: not a JSON object at all)
        assert error.param in refused_by_schema, (error.param, refused_by_schema)
    else:
        assert refused_by_schema is None, f"only the schema refuses: {refused_by_schema}"
        assert parsed.model == parsed.payload["model"]
        streams = ENDPOINTS[path].streams
        assert parsed.stream is (streams and parsed.payload.get("stream") is True)


def test_every_json_route_checks_model_and_the_caps_it_has() -> None:
    assert len(JSON_PATHS) == 13 and len(FORM_PATHS) == 2
    assert CONTRACTS == [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/responses",
    ]
    assert ENDPOINTS["/v1/responses"].limit_fields == ("max_output_tokens",)
    assert ENDPOINTS["/v1/messages"].limit_fields == ("max_tokens",)
    assert ENDPOINTS["/v1/embeddings"].limit_fields == () and not ENDPOINTS["/tokenize"].streams


@pytest.mark.parametrize("path", CONTRACTS)
@settings(max_examples=200)
@given(body=bodies())
def test_parser_and_schema_accept_and_refuse_the_same_bodies(path: str, body: bytes) -> None:
    _assert_one_contract(path, body)


#: A body every JSON route accepts: each edge below changes one field of it.
VALID_BODY = {
    "model": "m",
    "messages": [],
    "prompt": "p",
    "stream": True,
    "max_tokens": 1,
    "max_output_tokens": 1,
}


@pytest.mark.parametrize("path", CONTRACTS)
@pytest.mark.parametrize(
    ("field", "value"),
    [(field, value) for field, values in EDGES.items() for value in values],
)
def test_parser_and_schema_agree_on_the_edges(path: str, field: str, value: Any) -> None:
    _assert_one_contract(path, _encode(VALID_BODY))
    _assert_one_contract(path, _encode({**VALID_BODY, field: value}))
    _assert_one_contract(path, _encode({key: v for key, v in VALID_BODY.items() if key != field}))


form_text = st.text(alphabet='ab"\\;=\r\n é💡', max_size=8)


@settings(max_examples=200)
@given(
    fields=st.dictionaries(
        st.sampled_from(["model", "stream", "language", "prompt", "x"]), form_text, max_size=5
    ),
    audio=st.binary(max_size=64),
)
def test_a_form_is_read_as_httpx_encodes_it(fields: dict[str, str], audio: bytes) -> None:
    request = httpx.Request("POST", "/", data=fields, files={"file": ("a.wav", audio)})
    body = request.read()
    content_type = request.headers["content-type"]
    try:
        parsed = parse_form(body, content_type)
    except OpenAIError as error:
        assert error.status == 400
        stream = fields.get("stream", "false").strip().lower()
        assert error.param == ("model" if not fields.get("model") else "stream"), stream
        return
    assert parsed.model == fields["model"]
    assert parsed.stream is (fields.get("stream", "").strip().lower() == "true")
    # a rewrite changes that field only: the file and the other fields are as sent
    boundary = multipart.boundary(content_type)
    assert boundary is not None
    again = parse_form(parsed.encode(body, model="renamed"), content_type)
    assert again.model == "renamed" and parsed.payload["model"] == "renamed"
    rewritten = parsed.encode(body, model="renamed")
    assert rewritten.count(audio) >= 1 and len(rewritten) == len(body) - len(
        fields["model"].encode()
    ) + len(b"renamed")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"model": "m"}'),
        ("multipart/form-data", b"--x\r\n"),  # no boundary
        ("multipart/form-data; boundary=x", b"no boundary here"),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="m'),
        ("multipart/form-data; boundary=x", b"--x\r\n\r\nnever closed"),
    ],
)
def test_what_is_not_a_form_is_400(content_type: str, body: bytes) -> None:
    with pytest.raises(OpenAIError) as refused:
        parse_form(body, content_type)
    assert refused.value.status == 400
