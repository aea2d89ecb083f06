"""Reading and rewriting the text fields of a multipart/form-data body (audio uploads).

The gateway routes an audio upload by its ``model`` form field and forwards the
body as received; only a rewrite (a fallback model, an attached server's own
name for the model) changes one field. The file part is never copied or
decoded: parts are found with ``bytes.find`` on the delimiter (RFC 7578), which
scans a 25 MB upload in milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'(?:^|;)\s*name="([^"]*)"', re.IGNORECASE)


def boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` content type; None for any other type."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    found = _BOUNDARY.search(params)
    return found.group(1).strip().encode("latin-1") if found else None


def _parts(body: bytes, boundary: bytes) -> Iterator[tuple[str, bool, int, int]]:
    """Each part's field name, whether it is a file, and where its content starts and ends."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise ValueError("no part starts with the boundary of the content type")
        body_start = start + 2
    else:
        body_start = 0
    position = body_start + len(delimiter)
    while True:
        if body.startswith(b"--", position):
            return  # the closing delimiter
        if not body.startswith(b"\r\n", position):
            raise ValueError("a boundary is not followed by a line break")
        head_end = body.find(b"\r\n\r\n", position + 2)
        if head_end < 0:
            raise ValueError("a part's headers do not end")
        headers = body[position + 2 : head_end]
        start = head_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise ValueError("the form does not end with its closing boundary")
        name, is_file = "", False
        for line in headers.split(b"\r\n"):
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-disposition":
                found = _NAME.search(value)
                name = found.group(1).decode("utf-8", "replace") if found else ""
                is_file = b"filename" in value.lower()
        yield name, is_file, start, end
        position = end + 2 + len(delimiter)


def text_fields(body: bytes, boundary: bytes, names: Sequence[str]) -> dict[str, str]:
    """The values of the text fields ``names`` (the first of each); ValueError if malformed."""
    found: dict[str, str] = {}
    for name, is_file, start, end in _parts(body, boundary):
        if name in names and not is_file and name not in found:
            try:
                found[name] = body[start:end].decode()
            except UnicodeDecodeError:
                raise ValueError(f"field {name!r} is not UTF-8 text") from None
    return found


def with_field(body: bytes, boundary: bytes, name: str, value: str) -> bytes:
    """``body`` with the text field ``name`` set to ``value`` (added at the front if absent)."""
    for part, is_file, start, end in _parts(body, boundary):
        if part == name and not is_file:
            return body[:start] + value.encode() + body[end:]
    field = (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
        + value.encode() + b"\r\n"
    )  # fmt: skip
    return field + body
