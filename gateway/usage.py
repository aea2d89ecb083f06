"""Token use read from engine answers as they pass: tokens-per-minute limits and metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson


class UsageMeter:
    """Reads an answer's token usage and reports it as soon as it passes.

    (Before the stream's ``[DONE]`` reaches the client: a client's next request
    must already see the tokens counted.)

    Each API puts usage somewhere else: OpenAI's ``usage`` (prompt, completion and
    total tokens; embeddings and the pooling routes have only prompt tokens), the
    Responses API's ``usage`` and, streaming, its ``response.completed`` event's
    ``response.usage`` (input and output tokens), Anthropic's ``usage`` and,
    streaming, ``message_start``'s ``message.usage`` then ``message_delta``'s
    ``usage``, whose counts are running totals: each report charges only what is
    new since the last.

    For streams it looks at whole SSE events only where an event mentions
    ``"usage"`` (cheap for the others), and drops the usage-only event when the
    gateway asked the engine for it on the client's behalf (``strip``).
    """

    def __init__(self, on_usage: Callable[[int], None] | None, strip: bool = False) -> None:
        self._on_usage = on_usage
        self._strip = strip
        self._buffer = b""
        #: From the answer's ``usage``, once it passed (for the gateway's metrics).
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._charged = 0

    def feed(self, chunk: bytes) -> bytes:
        """A piece of a stream in; the bytes to pass on to the client out."""
        if not self._buffer and chunk.endswith(b"\n\n") and b'"usage"' not in chunk:
            return chunk  # whole events without usage: the common case, nothing to copy
        data = self._buffer + chunk
        last = data.rfind(b"\n\n")
        end = last + 2 if last >= 0 else 0  # up to the last whole event; the rest waits
        complete, self._buffer = data[:end], data[end:]
        if b'"usage"' not in complete:
            return complete
        kept = []
        for event in complete.split(b"\n\n")[:-1]:
            payload = _data(event)
            if payload is not None and b'"usage"' in payload:
                parsed = self._read(payload)
                if self._strip and parsed is not None and not parsed.get("choices"):
                    continue
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def read_body(self, body: bytes) -> None:
        """A whole (non-streaming) answer."""
        self._read(body)

    def _read(self, data: bytes) -> dict[str, Any] | None:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(parsed, dict):
            return None
        usage = parsed.get("usage")
        if not isinstance(usage, dict):  # Responses' response.completed, Anthropic's message_start
            inner = parsed.get("response") or parsed.get("message")
            usage = inner.get("usage") if isinstance(inner, dict) else None
            if not isinstance(usage, dict):
                return parsed
        # OpenAI's names, else the Responses and Anthropic APIs' (inline: every answer passes)
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        total = usage.get("total_tokens")
        prompt = prompt if type(prompt) is int and prompt >= 0 else None
        completion = completion if type(completion) is int and completion >= 0 else None
        total = total if type(total) is int and total >= 0 else None
        if prompt is None and completion is None and total is None:
            return parsed
        if prompt is not None:
            self.prompt_tokens = prompt
        if completion is not None:
            self.completion_tokens = completion
        if total is None:
            total = self.prompt_tokens + self.completion_tokens
        if self._on_usage is not None and total > self._charged:
            self._on_usage(total - self._charged)
        self._charged = max(self._charged, total)
        return parsed

    def drop_partial(self) -> None:
        """Forget an unfinished event: its stream broke, the rest comes from another worker."""
        self._buffer = b""

    def finish(self) -> bytes:
        """The answer ended: what was still buffered (an unterminated last event)."""
        rest, self._buffer = self._buffer, b""
        return rest


def _data(event: bytes) -> bytes | None:
    """The JSON of an SSE event's data line (after an "event: <type>" line in the Responses and
    Anthropic APIs)."""
    if event.startswith(b"data: {"):
        return event[len(b"data: ") :]
    found = event.find(b"\ndata: {")
    return event[found + len(b"\ndata: ") :] if found >= 0 else None
