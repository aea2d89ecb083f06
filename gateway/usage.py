"""Token use read from engine answers as they pass: tokens-per-minute limits and metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson


class UsageMeter:
    """Reads ``usage.total_tokens`` from an answer and reports it as soon as it passes.

    (Before the stream's ``[DONE]`` reaches the client: a client's next request
    must already see the tokens counted.)

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
            if event.startswith(b"data: {") and b'"usage"' in event:
                parsed = self._read(event[len(b"data: ") :])
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
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.prompt_tokens = prompt if isinstance(prompt, int) else 0
            self.completion_tokens = completion if isinstance(completion, int) else 0
            if self._on_usage is not None:
                self._on_usage(usage["total_tokens"])
        return parsed

    def drop_partial(self) -> None:
        """Forget an unfinished event: its stream broke, the rest comes from another worker."""
        self._buffer = b""

    def finish(self) -> bytes:
        """The answer ended: what was still buffered (an unterminated last event)."""
        rest, self._buffer = self._buffer, b""
        return rest
