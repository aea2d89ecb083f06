"""Reading an OpenAI server-sent event stream, for fleetserve's own clients (chat, bench)."""

from __future__ import annotations

import json
from typing import Any


def stream_event(line: str) -> dict[str, Any] | None:
    """The JSON of one ``data:`` line; None for other lines and ``[DONE]``.

    Raises RuntimeError for an error event (a stream that failed part way).
    """
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    data: dict[str, Any] = json.loads(line[6:])
    if "error" in data:
        raise RuntimeError(str(data["error"].get("message", data["error"])))
    return data
