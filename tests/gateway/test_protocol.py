"""The hot path's request parser and the pydantic models of /openapi.json are one contract.

``parse_request`` checks a body by hand (it is on every request's path); the
models in gateway/protocol.py describe the same contract to clients. Hypothesis
draws bodies mixing valid and invalid values of every field the gateway reads,
extra fields, JSON that is not an object and bytes that are not JSON, and the
two must accept and refuse the same ones; the edges a type check most easily
gets wrong are also tried every time, by hand.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetserve.errors import OpenAIError
from gateway.protocol import ENDPOINTS, MAX_TOKENS_FIELDS, parse_request

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
        assert parsed.stream is (parsed.payload.get("stream") is True)


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
@settings(max_examples=200)
@given(body=bodies())
def test_parser_and_schema_accept_and_refuse_the_same_bodies(path: str, body: bytes) -> None:
    _assert_one_contract(path, body)


#: A body both endpoints accept: each edge below changes one field of it.
VALID_BODY = {"model": "m", "messages": [], "prompt": "p", "stream": True, "max_tokens": 1}


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
@pytest.mark.parametrize(
    ("field", "value"),
    [(field, value) for field, values in EDGES.items() for value in values],
)
def test_parser_and_schema_agree_on_the_edges(path: str, field: str, value: Any) -> None:
    _assert_one_contract(path, _encode(VALID_BODY))
    _assert_one_contract(path, _encode({**VALID_BODY, field: value}))
    _assert_one_contract(path, _encode({key: v for key, v in VALID_BODY.items() if key != field}))
