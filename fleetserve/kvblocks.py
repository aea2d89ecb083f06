"""KV-cache block keys and the event stream a worker serves its gateways.

A block key names the content of one full KV-cache block *and everything before it*: the
key of block ``i`` hashes the key of block ``i - 1`` with block ``i``'s token ids. Two
prompts share block ``i`` in an engine's prefix cache exactly when they share its key, so
a gateway that tokenizes a request as the engine does can ask "how many leading blocks of
this prompt does worker W hold?" with one set lookup per block.

vLLM publishes its own block hashes (SHA-256 over a Python pickle, truncated), which no
gateway should have to reproduce; its ``BlockStored`` events carry each block's token ids,
so the worker's agent (workers/kvevents.py) names blocks with these keys instead, and the
gateways compute the same keys from the request (gateway/tokenize.py). The same function
serves text chunks for engines without events (gateway/routing.py, ``prefix_tree``).

The stream (``GET /kv/events`` on the worker's agent) is newline-delimited JSON, one
:class:`KvMessage` per line: a ``snapshot`` first (every block the engine holds), then
``stored``/``removed``/``cleared`` in the engine's order, a ``ping`` when idle. A new
``snapshot`` replaces everything before it (the engine restarted, or the agent lost events).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence
from enum import StrEnum

from pydantic import Field

from fleetserve.protocol import Internal

ROOT_KEY = 0  # the "key" before the first block
_BLOCK_KEY_BYTES = 8  # 64 bits: collisions stay negligible below ~10^8 blocks per model


def block_keys(tokens: Sequence[int], block_size: int, parent: int = ROOT_KEY) -> list[int]:
    """The chained keys of every *full* block of ``tokens`` (a partial tail has none)."""
    return _chain(array("q", tokens).tobytes(), 8 * block_size, parent)


def text_block_keys(text: str, block_chars: int) -> list[int]:
    """Chained keys of ``text`` in chunks of ``block_chars`` characters (no tokenizer)."""
    return _chain(text.encode("utf-32-le"), 4 * block_chars, ROOT_KEY)


def _chain(data: bytes, chunk_bytes: int, parent: int) -> list[int]:
    keys = []
    previous = parent.to_bytes(_BLOCK_KEY_BYTES, "little")
    for start in range(0, len(data) - chunk_bytes + 1, chunk_bytes):
        chunk = data[start : start + chunk_bytes]
        previous = hashlib.blake2b(previous + chunk, digest_size=_BLOCK_KEY_BYTES).digest()
        keys.append(int.from_bytes(previous, "little"))
    return keys


class KvMessageType(StrEnum):
    SNAPSHOT = "snapshot"
    STORED = "stored"
    REMOVED = "removed"
    CLEARED = "cleared"
    PING = "ping"


class KvMessage(Internal):
    """One line of a worker's KV event stream."""

    type: KvMessageType
    keys: list[int] = Field(default_factory=list, description="Block keys stored or removed.")
    block_size: int | None = Field(
        None, ge=1, description="Tokens per block (snapshot; None until the engine said)."
    )
    engine_starts: int = Field(
        0, ge=0, description="How many times the agent started its engine (snapshot)."
    )


def encode_lines(messages: Iterable[KvMessage]) -> bytes:
    return b"".join(m.model_dump_json(exclude_defaults=True).encode() + b"\n" for m in messages)
