"""Tokenizing a request in the gateway as its engine will, for cache-aware routing.

Only the ``kv_events`` policy asks for tokens (RoutingContext.prompt_tokens, computed on
first use), so every other policy's requests never pay for it. Each model's tokenizer is
fetched once from one of its workers' agents (``GET /kv/tokenizer``: the model's own
``tokenizer.json``, ``tokenizer_config.json`` and chat template) and built off the event
loop; until it is there, the policy routes that model's requests as misses.

What vLLM 0.32 does, and so what this does:

- chat: the chat template rendered with jinja2 the way transformers renders it (sandboxed,
  ``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now``,
  the special tokens as variables), ``add_generation_prompt`` true unless the request says,
  then encoded with ``add_special_tokens`` false unless the request says;
- completions: the prompt encoded with ``add_special_tokens`` true unless the request says;
  a prompt given as token ids is used as it is.

What is cached: a chat template puts special tokens between messages, and a tokenizer
encodes the text between two added tokens on its own (it splits there first), so the
tokens of a long stretch seen twice (a system prompt, an earlier turn) are kept, by its
text, in a least-recently-used table of at most TOKENIZE_CACHE_CHARS characters: a request
that repeats one encodes only the rest. Where splitting there could differ from the whole
encoding (a normalizer, added tokens that strip the spaces next to them), every request is
encoded whole.

Where it differs (the rendering is then only approximate): a content part that is not
text (an image: vLLM adds placeholder tokens), templates that expect OpenAI-style content
lists (vLLM detects them and passes lists; this always joins the text parts with a
newline, as vLLM does for most templates), tool calls whose arguments vLLM parses to
objects, a ``chat_template`` given in the request, and models with only a slow
(sentencepiece) tokenizer (no ``tokenizer.json``: no tokens at all). A wrong rendering
can only lower the hit rate: the tokens decide where a request goes, never what is sent.
"""

from __future__ import annotations

import json
import logging
import re
from array import array
from collections import OrderedDict
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from fleetserve import constants

logger = logging.getLogger(__name__)

_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


class PromptTokenizer:
    """One model's tokenizer and chat template, as its engine uses them."""

    def __init__(self, files: dict[str, str]) -> None:
        """``files``: the model's tokenizer files by name (tokenizer.json is required)."""
        self.tokenizer = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
        self._split, self._added = _added_token_split(json.loads(files["tokenizer.json"]))
        self._segments: OrderedDict[str, array[int]] = OrderedDict()
        self._seen_once: OrderedDict[int, None] = OrderedDict()  # hashes of stretches
        self._cached_chars = 0
        config: dict[str, Any] = json.loads(files.get("tokenizer_config.json") or "{}")
        special_map: dict[str, Any] = json.loads(files.get("special_tokens_map.json") or "{}")
        self.special = {
            name: _token_text(config.get(name, special_map.get(name))) for name in _SPECIAL_TOKENS
        }
        template = _chat_template(files, config)
        self.template = _environment().from_string(template) if template else None

    def tokens(self, payload: dict[str, Any]) -> list[int] | None:
        """The prompt's token ids, or None when this request's prompt cannot be rendered."""
        prompt = self.prompt(payload)
        if prompt is None:
            return None
        text, special = prompt
        return text if isinstance(text, list) else self.encode(text, special)

    def prompt(self, payload: dict[str, Any]) -> tuple[str | list[int], bool] | None:
        """The text the engine will encode (or its token ids), and whether with the special
        tokens of the tokenizer's post-processor; None when it cannot be rendered."""
        if "messages" in payload:
            text = self._chat(payload)
            return None if text is None else (text, payload.get("add_special_tokens") is True)
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt:  # a batch, or token ids: the first prompt
            prompt = prompt[0] if not isinstance(prompt[0], int) else prompt
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt, False
        if not isinstance(prompt, str):
            return None
        return prompt, payload.get("add_special_tokens", True) is not False

    def _chat(self, payload: dict[str, Any]) -> str | None:
        if self.template is None:
            return None
        messages = []
        for message in payload.get("messages") or []:
            if not isinstance(message, dict):
                return None
            content = message.get("content")
            if isinstance(content, list):
                texts = [p.get("text") if isinstance(p, dict) else None for p in content]
                if not all(isinstance(t, str) for t in texts):
                    return None  # images, audio: vLLM adds placeholders this cannot know
                message = {**message, "content": "\n".join(t for t in texts if t is not None)}
            messages.append(message)
        kwargs = payload.get("chat_template_kwargs")
        continue_final = payload.get("continue_final_message") is True
        try:
            text: str = self.template.render(
                messages=messages,
                tools=payload.get("tools"),
                documents=payload.get("documents"),
                add_generation_prompt=payload.get("add_generation_prompt", not continue_final),
                **self.special,
                **(kwargs if isinstance(kwargs, dict) else {}),
            )
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            logger.debug("chat template failed for routing (the engine decides): %s", exc)
            return None
        return text

    def encode(self, text: str, special: bool) -> list[int]:
        """``text``'s token ids; long stretches between added tokens from the cache."""
        if self._split is None or special:  # a post-processor's tokens: encode it whole
            return list(self.tokenizer.encode(text, add_special_tokens=special).ids)
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            added = self._added.get(piece)
            if added is not None:
                ids.append(added)
            elif len(piece) < constants.TOKENIZE_CACHE_MIN_CHARS:
                ids += self.tokenizer.encode(piece, add_special_tokens=False).ids
            else:
                ids += self._segment(piece)
        return ids

    def _segment(self, piece: str) -> array[int]:
        segments = self._segments
        cached = segments.get(piece)
        if cached is not None:
            segments.move_to_end(piece)
            return cached
        seen, digest = self._seen_once, hash(piece)
        if digest not in seen:  # kept from its second time on: a unique prompt costs nothing
            seen[digest] = None
            if len(seen) > constants.TOKENIZE_CACHE_SEEN:
                seen.popitem(last=False)
            return array("q", self.tokenizer.encode(piece, add_special_tokens=False).ids)
        del seen[digest]
        cached = segments[piece] = array(
            "q", self.tokenizer.encode(piece, add_special_tokens=False).ids
        )
        self._cached_chars += len(piece)
        while self._cached_chars > constants.TOKENIZE_CACHE_CHARS:
            gone, _ = segments.popitem(last=False)
            self._cached_chars -= len(gone)
        return cached


def _added_token_split(spec: dict[str, Any]) -> tuple[re.Pattern[str] | None, dict[str, int]]:
    """A pattern splitting text at its added tokens (kept, as groups), and their ids; no
    pattern where encoding the stretches apart could differ from encoding the whole."""
    tokens = spec.get("added_tokens") or []
    added = {t["content"]: t["id"] for t in tokens}
    plain = all(not (t.get("lstrip") or t.get("rstrip") or t.get("single_word")) for t in tokens)
    if not added or not plain or spec.get("normalizer") is not None:
        return None, added
    # longest first: at one position the longest added token wins, as in the tokenizer
    alternatives = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
    return re.compile(f"({alternatives})"), added


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(files: dict[str, str], config: dict[str, Any]) -> str | None:
    """The default chat template, wherever this model's files keep it."""
    if files.get("chat_template.jinja"):
        return files["chat_template.jinja"]
    template = json.loads(files.get("chat_template.json") or "{}").get("chat_template")
    template = template or config.get("chat_template")
    if isinstance(template, list):  # named templates: the one called "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _environment() -> jinja2.Environment:
    """The environment transformers renders chat templates in (its settings, not its code)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
