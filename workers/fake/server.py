"""A synthetic OpenAI server: streams deterministic tokens at a set rate.

For routing and resume tests and for measuring the gateway's own overhead: it
answers like vLLM's OpenAI server (same response shapes, ``return_token_ids``,
token-id prompts, ``/detokenize``, the same ``vllm:`` load metrics) at a cost
close to nothing. Its answers are a function of the prompt (workers/fake/tokens.py),
so an answer continued from its token ids on another fake worker is the same answer.
It does not implement stop strings, logprobs or ``n``.

    python -m workers.fake.server --port 9000 --served-name fake --tokens-per-s 100
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fleetserve.errors import error_body
from fleetserve.http import serve
from workers.fake.tokens import TextStream, Vocabulary, render_chat
from workers.load import vllm_load_metrics

DEFAULT_MAX_TOKENS = 16


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(status: int, message: str, code: str | None = None) -> Response:
    return _json(error_body(status, message, code), status)


#: What vLLM 0.32 streams when its engine core died under a request.
_ENGINE_DEAD = (
    b'data: {"error": {"message": "EngineCore encountered an issue.", '
    b'"type": "InternalServerError", "param": null, "code": 500}}\n\n'
)


class EngineCrash(Exception):
    """Raised inside a stream to cut its connection, as a dying engine process would."""


@dataclass
class Fault:
    """A failure the engine acts out, for tests (the engine keeps running).

    ``reset``: each stream's connection is cut after ``after_tokens`` tokens (a
    non-streaming request gets a 500); ``error``: the stream ends with vLLM's error
    event for a dead engine instead; ``eof``: it ends there, without ``[DONE]``;
    ``hang``: the stream stops sending; ``http500``: every request is answered with a
    500 at once.
    """

    kind: Literal["reset", "error", "eof", "hang", "http500"]
    after_tokens: int = 0


@dataclass
class _Generation:
    """One request's parameters, read and checked."""

    chat: bool
    prompt: list[int]
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    token_ids: bool


class FakeServer:
    """The state and behaviour of one fake OpenAI server."""

    def __init__(
        self,
        names: list[str],
        tokens_per_s: float,
        ttft_s: float,
        vocabulary: str = "count",
        reject_status: int = 0,
    ) -> None:
        self.names = names
        self.token_interval_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.ttft_s = ttft_s
        self.vocabulary = Vocabulary.named(vocabulary)()
        #: Answer every generation with this status (429: an engine over its limits); 0: never.
        self.reject_status = reject_status
        self.running = 0
        self.finished = 0
        self.generated = 0  # output tokens, as vLLM's generation_tokens_total counts them
        #: Requests answered at all (faults included), for tests.
        self.requests = 0
        self.fault: Fault | None = None
        #: vLLM's sleep mode (--sleep-mode): asleep, generations are refused.
        self.asleep = False

    def _read(self, body: dict[str, Any], chat: bool) -> _Generation | Response:
        max_tokens = (
            body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        )
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return _error(400, "max_tokens must be a positive integer")
        min_tokens = body.get("min_tokens") or 0
        if not isinstance(min_tokens, int) or min_tokens < 0:
            return _error(400, "min_tokens must be a non-negative integer")
        if chat:
            prompt = list(render_chat(body.get("messages")).encode())
        else:
            given = body.get("prompt")
            if isinstance(given, list) and len(given) == 1 and isinstance(given[0], str | list):
                given = given[0]  # a batch of one prompt
            if isinstance(given, str):
                prompt = list(given.encode())
            elif isinstance(given, list) and all(map(self.vocabulary.valid, given)):
                prompt = given
            else:
                return _error(400, "prompt must be a text or a list of token ids")
        return _Generation(
            chat,
            prompt,
            max_tokens,
            min_tokens,
            body.get("ignore_eos") is True,
            body.get("return_token_ids") is True,
        )

    async def _tokens(self, gen: _Generation) -> AsyncIterator[int]:
        """The generated token ids, paced; the last may be end-of-sequence."""
        vocabulary = self.vocabulary
        state = vocabulary.start(gen.prompt)
        if self.ttft_s:
            await asyncio.sleep(self.ttft_s)
        for i in range(gen.max_tokens):
            if i and self.token_interval_s:
                await asyncio.sleep(self.token_interval_s)
            token = vocabulary.next_token(state, not gen.ignore_eos and i >= gen.min_tokens)
            self.generated += 1
            yield token
            if token == vocabulary.eos:
                return
            state = vocabulary.advance(state, token)

    async def handle(self, request: Request) -> Response:
        self.requests += 1
        if self.fault is not None and self.fault.kind == "http500":
            return _error(500, "the fake engine fails every request (fault injected)")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        if body.get("model") not in self.names:
            return _error(
                404, f"The model `{body.get('model')}` does not exist.", "model_not_found"
            )
        chat = request.url.path.endswith("/chat/completions")
        gen = self._read(body, chat)
        if isinstance(gen, Response):
            return gen
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.names[0],
        }
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            return _error(400, "stream_options must be an object")
        if body.get("stream"):
            include_usage = bool(stream_options.get("include_usage"))
            return StreamingResponse(
                self._stream(gen, meta, include_usage, self.fault),
                media_type="text/event-stream",
            )
        return await self._answer(gen, meta)

    async def _answer(self, gen: _Generation, meta: dict[str, Any]) -> Response:
        self.running += 1
        try:
            tokens = [token async for token in self._tokens(gen)]
            if self.fault is not None and self.fault.kind in ("reset", "error"):
                return _error(500, "the fake engine failed (fault injected)")
        finally:
            self.running -= 1
            self.finished += 1
        stream = TextStream(self.vocabulary)  # as vLLM: an unfinished last character is left out
        text = "".join(map(stream.text, tokens))
        finish = "stop" if tokens[-1] == self.vocabulary.eos else "length"
        ids = {"token_ids": tokens} if gen.token_ids else {}
        if gen.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                **ids,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, **ids}
        kind = "chat.completion" if gen.chat else "text_completion"
        answer = {**meta, "object": kind, "choices": [choice], "usage": _usage(gen, len(tokens))}
        if gen.token_ids:
            answer["prompt_token_ids"] = gen.prompt
        return _json(answer)

    async def _stream(
        self, gen: _Generation, meta: dict[str, Any], include_usage: bool, fault: Fault | None
    ) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if gen.chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
            data = {**meta, "object": kind, "choices": [choice] if choice else [], **extra}
            return b"data: " + orjson.dumps(data) + b"\n\n"

        # As vLLM 0.32: the token-id fields are there, null unless asked for.
        prompt_ids = gen.prompt if gen.token_ids else None
        self.running += 1
        try:
            if gen.chat:
                first = {"role": "assistant", "content": ""}
                choice0 = {"index": 0, "delta": first, "logprobs": None, "finish_reason": None}
                yield chunk(choice0, prompt_token_ids=prompt_ids)
            text = TextStream(self.vocabulary)
            count = 0
            async for token in self._tokens(gen):
                if fault is not None and count == fault.after_tokens:
                    if fault.kind == "reset":
                        raise EngineCrash("the fake engine's stream was cut (fault injected)")
                    if fault.kind == "error":
                        yield _ENGINE_DEAD + b"data: [DONE]\n\n"
                    if fault.kind in ("error", "eof"):
                        return
                    await asyncio.Event().wait()  # hang: until the client goes away
                count += 1
                finish = None
                if token == self.vocabulary.eos:
                    finish = "stop"
                elif count == gen.max_tokens:
                    finish = "length"
                choice: dict[str, Any] = {"index": 0}
                if gen.chat:
                    choice["delta"] = {"content": text.text(token)}
                else:
                    choice["text"] = text.text(token)
                choice.update(logprobs=None, finish_reason=finish)
                if finish:
                    choice["stop_reason"] = None
                if not gen.chat:
                    choice["prompt_token_ids"] = prompt_ids if count == 1 else None
                choice["token_ids"] = [token] if gen.token_ids else None
                yield chunk(choice)
            if fault is not None and count == fault.after_tokens and fault.kind == "reset":
                raise EngineCrash("the fake engine's stream was cut after its last token")
            if include_usage:
                yield chunk(None, usage=_usage(gen, count))
            yield b"data: [DONE]\n\n"
        finally:
            self.running -= 1
            self.finished += 1

    async def detokenize(self, request: Request) -> Response:
        """vLLM's ``POST /detokenize``: token ids to text."""
        body = orjson.loads(await request.body())
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(map(self.vocabulary.valid, tokens)):
            return _error(400, "tokens must be a list of token ids")
        return _json({"prompt": self.vocabulary.detokenize(tokens)})

    async def generate(self, request: Request) -> Response:
        """``handle``, unless the engine is told to refuse (``reject_status``)."""
        if self.reject_status:
            return _error(self.reject_status, "the fake engine refuses (--reject-status)")
        if self.asleep:  # (vLLM fails a request sent to a sleeping engine too)
            return _error(503, "the engine is asleep", "engine_asleep")
        return await self.handle(request)

    async def transcribe(self, request: Request) -> Response:
        """/v1/audio/transcriptions and /translations: a multipart form with the audio file; the
        "transcript" says what arrived (real audio models cannot be made without a model hub)."""
        if self.reject_status:
            return _error(self.reject_status, "the fake engine refuses (--reject-status)")
        async with request.form(max_part_size=1024 * 1024) as form:
            model, upload = form.get("model"), form.get("file")
            if model not in self.names:
                return _error(404, f"The model `{model}` does not exist.", "model_not_found")
            if isinstance(upload, str) or upload is None:
                return _error(400, "the form has no file")
            audio = await upload.read()
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
        text = f"{len(audio)} bytes of {upload.filename} ({request.url.path.rsplit('/', 1)[1]})"
        return _json({"text": text, "fields": fields})

    async def models(self, _: Request) -> Response:
        data = [
            {"id": name, "object": "model", "owned_by": "fleetserve-fake"} for name in self.names
        ]
        return _json({"object": "list", "data": data})

    async def metrics(self, _: Request) -> Response:
        text = vllm_load_metrics(self.running, 0, self.generated, self.finished, self.names[0])
        return Response(text, media_type="text/plain; version=0.0.4")

    async def health(self, _: Request) -> Response:
        return Response(status_code=200)

    # vLLM's sleep mode routes (VLLM_SERVER_DEV_MODE=1 with --enable-sleep-mode; vLLM 0.32's
    # entrypoints/serve/dev/sleep/api_router.py), for the CPU tests of what drives them: the
    # CPU build of vLLM refuses sleep mode.

    async def sleep(self, request: Request) -> Response:
        self.asleep = True
        level = int(request.query_params.get("level", "1"))
        return _json({"status": "sleeping", "level": level})

    async def wake_up(self, _: Request) -> Response:
        self.asleep = False
        return _json({"status": "awake", "tags": None})

    async def is_sleeping(self, _: Request) -> Response:
        return _json({"is_sleeping": self.asleep})


def _usage(gen: _Generation, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = len(gen.prompt)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def build_app(engine: FakeServer, sleep_mode: bool = False) -> Starlette:
    sleep_routes = [
        Route("/sleep", engine.sleep, methods=["POST"]),
        Route("/wake_up", engine.wake_up, methods=["POST"]),
        Route("/is_sleeping", engine.is_sleeping),
    ]
    return Starlette(
        routes=[
            *(sleep_routes if sleep_mode else []),
            Route("/v1/chat/completions", engine.generate, methods=["POST"]),
            Route("/v1/completions", engine.generate, methods=["POST"]),
            Route("/detokenize", engine.detokenize, methods=["POST"]),
            Route("/v1/audio/transcriptions", engine.transcribe, methods=["POST"]),
            Route("/v1/audio/translations", engine.transcribe, methods=["POST"]),
            Route("/v1/models", engine.models),
            Route("/metrics", engine.metrics),
            Route("/health", engine.health),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uds", help="Listen on this Unix socket instead of --host/--port.")
    parser.add_argument("--served-name", nargs="+", required=True, help="Model names to answer to.")
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="0: as fast as possible.")
    parser.add_argument("--ttft-s", type=float, default=0.0, help="Delay before the first token.")
    parser.add_argument(
        "--vocabulary",
        choices=sorted(Vocabulary.registry),
        default=Vocabulary.default_name,
        help="count: ' tok0 tok1 ...' whatever the prompt; lm: words and multi-byte "
        "characters drawn from the prompt (see workers/fake/tokens.py).",
    )
    parser.add_argument(
        "--reject-status", type=int, default=0, help="Refuse every request with it (429, 503)."
    )
    parser.add_argument(
        "--load-s",
        type=float,
        default=0.0,
        help="Seconds to 'load the model' before listening (a cold start, for tests).",
    )
    parser.add_argument(
        "--sleep-mode",
        action="store_true",
        help="Serve vLLM's sleep mode routes (/sleep, /wake_up, /is_sleeping): asleep, "
        "generations are refused (503).",
    )
    args = parser.parse_args(argv)
    time.sleep(args.load_s)
    engine = FakeServer(
        args.served_name, args.tokens_per_s, args.ttft_s, args.vocabulary, args.reject_status
    )
    serve(build_app(engine, args.sleep_mode), host=args.host, port=args.port, uds=args.uds)


if __name__ == "__main__":
    main()
