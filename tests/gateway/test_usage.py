"""Token usage read from each API's answers as they pass (gateway/usage.py): plain objects,
events split anywhere, as engines send them (vLLM 0.32's shapes)."""

from __future__ import annotations

import orjson
import pytest

from gateway.usage import UsageMeter


def _event(data: dict[str, object], kind: str | None = None) -> bytes:
    head = f"event: {kind}\n".encode() if kind else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def _feed(stream: bytes, size: int) -> tuple[bytes, list[int], UsageMeter]:
    charged: list[int] = []
    meter = UsageMeter(charged.append)
    out = b"".join(meter.feed(stream[i : i + size]) for i in range(0, len(stream), size))
    return out + meter.finish(), charged, meter


ANTHROPIC_STREAM = b"".join(
    [
        _event(
            {
                "type": "message_start",
                "message": {"id": "m", "usage": {"input_tokens": 12, "output_tokens": 1}},
            },
            "message_start",
        ),
        _event({"type": "content_block_delta", "delta": {"text": "hi"}}, "content_block_delta"),
        _event(
            {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9}}, "message_delta"
        ),
        _event({"type": "message_stop"}, "message_stop"),
    ]
)

RESPONSES_STREAM = b"".join(
    [
        _event(
            {"type": "response.created", "response": {"id": "r", "usage": None}},
            "response.created",
        ),
        _event({"type": "response.output_text.delta", "delta": "x"}, "response.output_text.delta"),
        _event(
            {
                "type": "response.completed",
                "response": {
                    "id": "r",
                    "usage": {"input_tokens": 5, "output_tokens": 8, "total_tokens": 13},
                },
            },
            "response.completed",
        ),
    ]
)


@pytest.mark.parametrize("size", [1, 7, 64, 100_000])
def test_anthropic_streams_charge_their_running_totals_once(size: int) -> None:
    """message_start's input tokens, then message_delta's output tokens (a running total)."""
    out, charged, meter = _feed(ANTHROPIC_STREAM, size)
    assert out == ANTHROPIC_STREAM  # passed on unchanged
    assert sum(charged) == 12 + 9 and (meter.prompt_tokens, meter.completion_tokens) == (12, 9)


@pytest.mark.parametrize("size", [1, 13, 100_000])
def test_responses_streams_charge_response_completed(size: int) -> None:
    out, charged, meter = _feed(RESPONSES_STREAM, size)
    assert out == RESPONSES_STREAM
    assert charged == [13] and (meter.prompt_tokens, meter.completion_tokens) == (5, 8)


@pytest.mark.parametrize(
    ("body", "prompt", "completion", "total"),
    [
        ({"usage": {"input_tokens": 3, "output_tokens": 4}}, 3, 4, 7),  # Anthropic
        ({"usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}, 3, 4, 7),
        ({"usage": {"prompt_tokens": 6, "total_tokens": 6}}, 6, 0, 6),  # embeddings, rerank
        ({"input_tokens": 9}, 0, 0, None),  # count_tokens: counts, generates nothing
        ({"usage": {"prompt_tokens": True}}, 0, 0, None),
    ],
)
def test_whole_answers_of_each_api(
    body: dict[str, object], prompt: int, completion: int, total: int | None
) -> None:
    charged: list[int] = []
    meter = UsageMeter(charged.append)
    meter.read_body(orjson.dumps(body))
    assert (meter.prompt_tokens, meter.completion_tokens) == (prompt, completion)
    assert charged == ([] if total is None else [total])
