"""A synthetic OpenAI server: streams made-up tokens at a set rate.

For routing tests and for measuring the gateway's own overhead: it answers
like vLLM's OpenAI server (same response shapes, same ``vllm:`` load metrics)
at a cost close to nothing.

    python -m workers.fake.server --port 9000 --served-name fake --tokens-per-s 100
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fleetserve.errors import error_body
from workers.load import vllm_load_metrics

DEFAULT_MAX_TOKENS = 16


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(status: int, message: str, code: str | None = None) -> Response:
    return _json(error_body(status, message, code), status)


class FakeServer:
    """The state and behaviour of one fake OpenAI server."""

    def __init__(
        self, names: list[str], tokens_per_s: float, ttft_s: float, reject_status: int = 0
    ) -> None:
        self.names = names
        self.token_interval_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.ttft_s = ttft_s
        #: Answer every generation with this status (429: an engine over its limits); 0: never.
        self.reject_status = reject_status
        self.running = 0
        self.finished = 0
        self.generated = 0  # output tokens, as vLLM's generation_tokens_total counts them

    async def _tokens(self, count: int) -> AsyncIterator[str]:
        if self.ttft_s:
            await asyncio.sleep(self.ttft_s)
        for i in range(count):
            if i and self.token_interval_s:
                await asyncio.sleep(self.token_interval_s)
            self.generated += 1
            yield f" tok{i}"

    async def handle(self, request: Request) -> Response:
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
        max_tokens = (
            body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        )
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return _error(400, "max_tokens must be a positive integer")
        prompt_tokens = max(1, len(orjson.dumps(body.get("messages" if chat else "prompt"))) // 4)
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.names[0],
        }
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": max_tokens,
            "total_tokens": prompt_tokens + max_tokens,
        }
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            return _error(400, "stream_options must be an object")
        if body.get("stream"):
            include_usage = bool(stream_options.get("include_usage"))
            return StreamingResponse(
                self._stream(chat, meta, max_tokens, usage if include_usage else None),
                media_type="text/event-stream",
            )
        self.running += 1
        try:
            text = "".join([token async for token in self._tokens(max_tokens)])
        finally:
            self.running -= 1
            self.finished += 1
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": "length"}
        kind = "chat.completion" if chat else "text_completion"
        return _json({**meta, "object": kind, "choices": [choice], "usage": usage})

    async def _stream(
        self, chat: bool, meta: dict[str, Any], max_tokens: int, usage: dict[str, int] | None
    ) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
            data = {**meta, "object": kind, "choices": [choice] if choice else [], **extra}
            return b"data: " + orjson.dumps(data) + b"\n\n"

        self.running += 1
        try:
            if chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}})
            index = 0
            async for token in self._tokens(max_tokens):
                index += 1
                finish = "length" if index == max_tokens else None
                if chat:
                    yield chunk({"index": 0, "delta": {"content": token}, "finish_reason": finish})
                else:
                    yield chunk({"index": 0, "text": token, "finish_reason": finish})
            if usage:
                yield chunk(None, usage=usage)
            yield b"data: [DONE]\n\n"
        finally:
            self.running -= 1
            self.finished += 1

    async def generate(self, request: Request) -> Response:
        """``handle``, unless the engine is told to refuse (``reject_status``)."""
        if self.reject_status:
            return _error(self.reject_status, "the fake engine refuses (--reject-status)")
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


def build_app(engine: FakeServer) -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/chat/completions", engine.generate, methods=["POST"]),
            Route("/v1/completions", engine.generate, methods=["POST"]),
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
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-name", nargs="+", required=True, help="Model names to answer to.")
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="0: as fast as possible.")
    parser.add_argument("--ttft-s", type=float, default=0.0, help="Delay before the first token.")
    parser.add_argument(
        "--reject-status", type=int, default=0, help="Refuse every request with it (429, 503)."
    )
    args = parser.parse_args(argv)
    engine = FakeServer(args.served_name, args.tokens_per_s, args.ttft_s, args.reject_status)
    uvicorn.run(
        build_app(engine), host=args.host, port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
