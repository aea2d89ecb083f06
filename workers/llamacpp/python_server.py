"""llama-cpp-python's OpenAI server for one GGUF file, with what the agent needs added.

    python -m workers.llamacpp.python_server --model FILE --host H --port P \
        --served-name N... [ARGS]

llama-cpp-python's server (its ``[server]`` extra) has no ``/health`` and no
``/metrics``, and runs one request at a time behind a lock (no parallel slots).
This module builds its app with ``create_app`` and adds:

- ``GET /health``: 200 once the app exists. ``create_app`` loads the model
  before the port opens, so an answer means the model is loaded.
- OpenAI's sampling defaults (no repetition penalty unless asked for).
- ``GET /metrics``: in-flight requests and generated tokens counted by an ASGI
  middleware, in vLLM's metric names (workers/load.py reads those): one
  request runs, the others wait for the lock.

ARGS are llama-cpp-python's model settings as flags, ``--n-ctx 2048`` or
``--n_ctx=2048``; a flag without a value is ``true``. Unknown names are refused.
``--use-extra-bufts true|false`` turns llama.cpp's weight repacking (AMX on
Xeons) on or off; default off where the CPU has AMX (see set_extra_buffers).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fleetserve.errors import ConfigError
from workers.load import vllm_load_metrics
from workers.settings import engine_args_from_flags

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Our own setting (llama.cpp's model parameter of that name); see set_extra_buffers.
_EXTRA_BUFFERS = "use_extra_bufts"
# Requests that generate; /health, /metrics and /v1/models do not load the engine.
_GENERATING_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")


class InFlightCount:
    """Generating requests now in the server and tokens generated, as vLLM-named metrics."""

    def __init__(self) -> None:
        self.count = 0
        self.generated_tokens = 0

    def metrics(self) -> str:
        running = min(self.count, 1)  # the server's lock lets one request generate at a time
        return vllm_load_metrics(running, self.count - running, self.generated_tokens)


def tokens_in_answer(body: bytes, streamed: bool) -> int:
    """Output tokens in an answer: its usage, or (streams carry none) its token chunks.

    For streams an estimate, within a token or two: llama-cpp-python sends about one
    chunk per token (some empty, holding back part of a UTF-8 character); the chat
    stream's first chunk only carries the role, the last one only the finish reason.
    """
    if not streamed:
        try:
            return int(json.loads(body)["usage"]["completion_tokens"])
        except (ValueError, KeyError, TypeError):
            return 0
    return sum(
        1
        for line in body.split(b"\n")
        if line.startswith(b"data: {")
        and b'"finish_reason": null' in line
        and b'"role": "assistant"' not in line
    )


class InFlight:
    """ASGI middleware counting generating requests from arrival to the end of the answer."""

    def __init__(self, app: ASGIApp, counter: InFlightCount) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_GENERATING_PREFIXES):
            await self.app(scope, receive, send)
            return
        streamed = False
        pending = b""  # an answer's bytes not yet counted (a stream: its unfinished line)

        async def counting_send(message: Message) -> None:
            nonlocal streamed, pending
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                streamed = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                pending += message.get("body", b"")
                if streamed:
                    complete, _, pending = pending.rpartition(b"\n")
                    self.counter.generated_tokens += tokens_in_answer(complete, streamed=True)
                elif not message.get("more_body"):
                    self.counter.generated_tokens += tokens_in_answer(pending, streamed=False)
            await send(message)

        self.counter.count += 1
        try:
            await self.app(scope, receive, counting_send)  # returns when a stream has ended, too
        finally:
            self.counter.count -= 1


def parse_engine_args(args: list[str], known: set[str]) -> dict[str, str]:
    """``["--n-ctx", "2048", "--flash-attn"]`` -> ``{"n_ctx": "2048", "flash_attn": "true"}``."""
    parsed = engine_args_from_flags(args)
    for name in parsed:
        if name not in known:
            raise ConfigError(
                f"unknown setting {name!r}; llama-cpp-python's server takes "
                f"{', '.join(sorted(known))}"
            )
    return {name: "true" if value is True else str(value) for name, value in parsed.items()}


def openai_sampling_defaults() -> None:
    """No repetition penalty unless a request asks for one, as with OpenAI (and vLLM).

    llama-cpp-python's requests default to ``repeat_penalty: 1.1``, so greedy answers
    (``temperature: 0``) would differ from every other engine's. Must run before
    ``llama_cpp.server.app`` is imported: its routes capture the request models.
    """
    from llama_cpp.server import types

    for request in (types.CreateCompletionRequest, types.CreateChatCompletionRequest):
        request.model_fields["repeat_penalty"].default = 1.0
        request.model_rebuild(force=True)


def cpu_has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def set_extra_buffers(enabled: bool) -> None:
    """Whether llama.cpp repacks weights into "extra" CPU buffer types (AMX, ...).

    On a Xeon advertising AMX (llama-cpp-python 0.3.36) every quantized model (q8_0, q4_k_m)
    died with SIGSEGV in ggml_backend_amx_mul_mat on its first token; with the
    repacking off they run and answer like f32. llama-cpp-python 0.3.36 has no
    setting for it, so its default model parameters are wrapped.
    """
    import llama_cpp.llama_cpp as bindings

    default_params = bindings.llama_model_default_params

    def model_params() -> Any:
        params = default_params()
        params.use_extra_bufts = enabled
        return params

    bindings.llama_model_default_params = model_params


def build_app(model: str, served_names: list[str], engine_args: list[str]) -> Any:
    openai_sampling_defaults()
    from fastapi.responses import PlainTextResponse
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    # What fleetserve sets itself (the file, names, address) is not an engine argument.
    known = set(ModelSettings.model_fields) - {"model", "model_alias"}
    values: dict[str, Any] = parse_engine_args(engine_args, known | {_EXTRA_BUFFERS})
    extra_buffers = values.pop(_EXTRA_BUFFERS, "false" if cpu_has_amx() else "true")
    set_extra_buffers(extra_buffers.lower() in ("1", "true", "yes", "on"))
    values.setdefault("verbose", "false")  # llama.cpp's load log is pages long
    model_settings = ModelSettings(model=model, model_alias=served_names[0], **values)
    # True would end a streaming answer as soon as another request arrives.
    server_settings = ServerSettings(interrupt_requests=False)
    app = create_app(server_settings=server_settings, model_settings=[model_settings])
    counter = InFlightCount()

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(counter.metrics())

    app.add_middleware(InFlight, counter=counter)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="The GGUF file.")
    parser.add_argument("--served-name", nargs="+", required=True, help="Names clients use.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uds", help="Listen on this Unix socket instead of --host/--port.")
    args, engine_args = parser.parse_known_args(argv)
    try:
        app = build_app(args.model, args.served_name, engine_args)
    except ConfigError as exc:
        sys.exit(f"llamacpp engine: {exc}")

    from fleetserve.http import serve

    serve(app, host=args.host, port=args.port, uds=args.uds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
