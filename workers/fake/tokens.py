"""The fake engine's tokens: a byte-level tokenizer and a deterministic "language model".

Prompts are tokenized into their UTF-8 bytes (ids 0-255); a chat is rendered with a
plain template first. Each next token is a function of the whole context (prompt
and tokens so far) and nothing else, as a greedy language model's is, so that
continuing from ``prompt + generated[:k]`` (a token-id prompt) reproduces the rest
of an answer exactly: what the gateway's stream resume relies on, testable without
vLLM. Two vocabularies:

- ``count`` (the default): the n-th generated token reads `` tok{n}`` (its id is
  256 + n: the context's trailing run of such tokens says where the answer is).
  Cheap, and what most tests expect.
- ``lm``: words and multi-byte characters drawn by a hash of the whole context, so
  the answer depends on the prompt; a character such as 日 comes as one token per
  byte, and the text streams as vLLM's does, holding back the bytes of an
  unfinished character (a chunk with a token id and empty text). It also draws an
  end-of-sequence token now and then (``finish_reason: stop``) unless ``ignore_eos``.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fleetserve.registry import Registered

BYTE_TOKENS = 256

#: Multi-byte characters the lm vocabulary spells byte by byte; distinct first bytes, so a
#: character's first byte says which one it is.
_CHARACTERS = ("é", "ж", "日", "語", "🙂")
_BY_LEAD = {c.encode()[0]: c.encode() for c in _CHARACTERS}
_WORDS = (
    b" the", b" a", b" fleet", b" of", b" tokens", b" serves", b" every", b" request", b",",
    b".", b"\n", b" resume", b" exactly", b" gateway", b" worker", b" stream", b" once",
    b" again",
    # a space and the first byte of a character, as byte-level BPE vocabularies have: its
    # text streams at once, the character only with the next tokens
    " 日".encode()[:2],
)  # fmt: skip


def _unfinished(data: bytes) -> bytes:
    """The bytes of one of _CHARACTERS that ``data`` ends inside of (b"" if none)."""
    for start in range(max(len(data) - 3, 0), len(data)):
        full = _BY_LEAD.get(data[start])
        if full is not None and len(data) - start < len(full) and full.startswith(data[start:]):
            return data[start:]
    return b""


_MASK = (1 << 64) - 1


def render_chat(messages: Any) -> str:
    """The fake's chat template: ``<|role|>text`` lines, then the assistant's turn."""
    lines = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        lines.append(f"<|{message.get('role')}|>{content or ''}\n")
    return "".join(lines) + "<|assistant|>"


class Vocabulary(Registered):
    """Base class; vocabularies register with ``class X(Vocabulary, name="x")``."""

    kind = "vocabulary"
    #: Token ids at or above this are invalid (None: no limit).
    size: ClassVar[int | None] = None
    eos: ClassVar[int | None] = None

    def piece(self, token: int) -> bytes:
        raise NotImplementedError

    def start(self, prompt: Sequence[int]) -> Any:
        """The model's state after reading ``prompt``."""
        raise NotImplementedError

    def next_token(self, state: Any, eos_allowed: bool) -> int:
        """The token that follows the context ``state`` stands for."""
        raise NotImplementedError

    def advance(self, state: Any, token: int) -> Any:
        """``state`` with ``token`` appended to the context."""
        raise NotImplementedError

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(map(self.piece, tokens)).decode("utf-8", "replace")

    def valid(self, token: object) -> bool:
        return (
            isinstance(token, int)
            and not isinstance(token, bool)
            and token >= 0
            and (self.size is None or token < self.size)
        )


class CountingVocabulary(Vocabulary, name="count", default=True):
    """`` tok0 tok1 ...``: the state is how many generated tokens end the context."""

    def piece(self, token: int) -> bytes:
        return bytes([token]) if token < BYTE_TOKENS else f" tok{token - BYTE_TOKENS}".encode()

    def start(self, prompt: Sequence[int]) -> int:
        run = 0
        for token in reversed(prompt):
            if token < BYTE_TOKENS:
                break
            run += 1
        return run

    def next_token(self, state: int, eos_allowed: bool) -> int:
        return BYTE_TOKENS + state

    def advance(self, state: int, token: int) -> int:
        return state + 1 if token >= BYTE_TOKENS else 0


@dataclass(frozen=True, slots=True)
class _LmState:
    hash: int
    #: The bytes of an unfinished character ending the context.
    partial: bytes


class HashingVocabulary(Vocabulary, name="lm"):
    """Words and multi-byte characters drawn by a hash of the whole context."""

    size = BYTE_TOKENS + len(_WORDS) + 1
    eos = BYTE_TOKENS + len(_WORDS)

    def piece(self, token: int) -> bytes:
        if token < BYTE_TOKENS:
            return bytes([token])
        return b"" if token == self.eos else _WORDS[token - BYTE_TOKENS]

    def start(self, prompt: Sequence[int]) -> _LmState:
        state = _LmState(0, b"")
        for token in prompt:
            state = self.advance(state, token)
        return state

    def advance(self, state: _LmState, token: int) -> _LmState:
        digest = (state.hash * 0x100000001B3 + token + 1) & _MASK
        return _LmState(digest, _unfinished(state.partial + self.piece(token)))

    def next_token(self, state: _LmState, eos_allowed: bool) -> int:
        if state.partial:  # finish the character
            return _BY_LEAD[state.partial[0]][len(state.partial)]
        mixed = (state.hash * 0x9E3779B97F4A7C15) & _MASK
        mixed ^= mixed >> 31
        if eos_allowed and mixed % 53 == 0:
            return self.eos
        if mixed % 7 == 0:  # start a multi-byte character
            return _CHARACTERS[(mixed >> 8) % len(_CHARACTERS)].encode()[0]
        return BYTE_TOKENS + (mixed >> 16) % len(_WORDS)


class TextStream:
    """A generation's text as vLLM streams it: an unfinished character's bytes wait."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self._vocabulary = vocabulary
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def text(self, token: int) -> str:
        return str(self._decoder.decode(self._vocabulary.piece(token)))
