"""The gateway's ASGI app.

The two OpenAI POST routes are the hot path: they are served straight from
ASGI (no framework routing, middleware or validation layers) and read only
what routing needs from the body. Everything else (/v1/models, /health,
/metrics, the OpenAPI docs) is a plain FastAPI app behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from fastapi import FastAPI, Request
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from fleetserve import constants
from fleetserve.config import ApiKey, GatewaySettings
from fleetserve.errors import OpenAIError, error_response, install_error_handlers
from gateway.auth import KeyStore
from gateway.metrics import NO_KEY, GatewayMetrics, RequestRecord
from gateway.proxy import Proxy
from gateway.routing import RoutingPolicy
from gateway.schema import install_openapi
from gateway.table import RouteTableWatcher
from gateway.upstream import UpstreamPool
from gateway.usage import UsageMeter

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("fleetserve.access")

SETTINGS_ENV = "FLEETSERVE_GATEWAY_SETTINGS"
# Put in front of a streaming request's JSON object to get its usage from the engine.
_INCLUDE_USAGE = b'{"stream_options":{"include_usage":true},'
# path -> the field a request to it must have
_PROXIED_ROUTES = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(
        413, f"request body is larger than {max_bytes} bytes", code="request_too_large"
    )


async def read_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    """The request body, refused with 413 past ``max_bytes`` (before reading all of it)."""
    declared = _header(scope, b"content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []  # joined once: repeated += would copy a large body many times
    size = 0
    while True:
        message: Message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def check_max_tokens(payload: dict[str, Any], limit: int | None) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        value = payload.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OpenAIError(
                400, f"'{field}' must be a positive integer", code="invalid_value", param=field
            )
        if limit is not None and value > limit:
            raise OpenAIError(
                400,
                f"'{field}' is {value}; this gateway allows at most {limit}",
                code="max_tokens_too_large",
                param=field,
            )


def parse_request(body: bytes, required: str) -> tuple[str, bool, dict[str, Any]]:
    """Read only what routing needs: the model name and whether to stream."""
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(
            400, f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(
            400,
            "you must provide a model parameter",
            code="missing_required_parameter",
            param="model",
        )
    if payload.get(required) is None:
        raise OpenAIError(
            400,
            f"Missing required parameter: '{required}'.",
            code="missing_required_parameter",
            param=required,
        )
    return model, payload.get("stream") is True, payload


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


class Gateway:
    """ASGI entry point: the hot OpenAI routes, then the FastAPI app for the rest."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.keys = KeyStore(
            settings.keys, Path(settings.keys_file) if settings.keys_file else None
        )
        if not self.keys.enabled:
            logger.warning(
                "NO API KEYS CONFIGURED: the gateway is open to anyone who can reach port %d "
                "(give it keys with --keys-file or gateway.keys in the cluster file)",
                settings.port,
            )
        self.api = _build_api(self)
        self.proxy: Proxy | None = None
        self.watcher: RouteTableWatcher | None = None
        self._policies: dict[tuple[str, str], RoutingPolicy] = {}

    def policy_for(self, model: str) -> RoutingPolicy:
        """The policy the model's workers registered with (from the cluster file)."""
        assert self.watcher is not None
        workers = self.watcher.ready_by_model.get(model)
        name = workers[0].routing_policy if workers else RoutingPolicy.default_name
        policy = self._policies.get((model, name))
        if policy is None:
            cls = RoutingPolicy.registry.get(name)
            if cls is None:
                logger.warning("unknown routing policy %r for %s: using least_load", name, model)
                cls = RoutingPolicy.registry[RoutingPolicy.default_name]
            policy = self._policies[(model, name)] = cls()
        return policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            required = _PROXIED_ROUTES.get(scope["path"])
            if required is not None:
                record = RequestRecord(time.perf_counter())
                response = await self._proxied(scope, receive, required, record)
                try:
                    await response(scope, receive, send)
                finally:
                    self.metrics.record(record, time.perf_counter())
                return
        await self.api(scope, receive, send)

    async def _proxied(
        self, scope: Scope, receive: Receive, required: str, record: RequestRecord
    ) -> Response:
        model = "-"
        try:
            key = (
                self.keys.authenticate(_header(scope, b"authorization"))
                if self.keys.enabled
                else None
            )
            body = await read_body(scope, receive, self.settings.max_body_bytes)
            model, stream, payload = parse_request(body, required)
            check_max_tokens(payload, self.settings.max_tokens_limit)
            if key is not None:
                record.key = key.name
            record.stream = stream
            limits = self.keys.admit(key, model) if key is not None else {}
            assert self.proxy is not None, "the lifespan did not run"
            session = _header(scope, b"x-session-id") or payload.get("user")
            body, record.meter = self._metered(key, body, payload, stream)
            async with asyncio.timeout(self.settings.request_timeout_s):
                response = await self.proxy.forward(
                    scope["path"],
                    body,
                    model,
                    stream,
                    payload,
                    session if isinstance(session, str) else None,
                    record,
                )
            for name, value in limits.items():
                response.headers[name] = value
        except OpenAIError as exc:
            response = error_response(exc)
        except TimeoutError:
            timeout_s = self.settings.request_timeout_s
            message = f"no answer from a worker of `{model}` within {timeout_s}s"
            response = error_response(OpenAIError(504, message, code="timeout"))
        except Exception:
            logger.exception("unexpected error on %s", scope["path"])
            response = error_response(OpenAIError(500, "internal error", code="internal_error"))
        # Model names come from clients: only known ones become label values (bounded series).
        known = self.watcher is not None and model in self.watcher.ready_by_model
        record.model = model if known else "unknown"
        record.status = response.status_code
        if self.settings.access_log:
            access_logger.info(
                "%s",
                orjson.dumps(
                    {
                        "path": scope["path"],
                        "model": model,
                        "status": response.status_code,
                        "worker": response.headers.get("x-fleetserve-worker"),
                        "key": record.key if record.key != NO_KEY else None,
                        "ms_to_headers": round(1000 * (time.perf_counter() - record.started), 2),
                    }
                ).decode(),
            )
        return response

    def _metered(
        self, key: ApiKey | None, body: bytes, payload: dict[str, Any], stream: bool
    ) -> tuple[bytes, UsageMeter]:
        """Count the answer's tokens (metrics; and against ``key`` if it has a tokens budget).

        Streams must then carry their usage: if the client did not ask for it,
        ask the engine for ``stream_options.include_usage`` and take the usage
        event out again.
        """
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise OpenAIError(
                400,
                "'stream_options' must be an object",
                code="invalid_type",
                param="stream_options",
            )
        asked = options is not None and options.get("include_usage") is True
        charge = None
        if key is not None and key.tpm is not None:
            charge = functools.partial(self.keys.charge, key)
        meter = UsageMeter(charge, strip=stream and not asked)
        if stream and not asked:
            given = "stream_options" in payload  # even as null: then a second key would win
            payload["stream_options"] = {**(options or {}), "include_usage": True}
            start = body.lstrip()
            if not given and start.startswith(b"{"):
                # the usual case: the field goes in front, the client's bytes stay as they are
                # (cheaper than encoding the whole payload again, which a long prompt makes big)
                body = _INCLUDE_USAGE + start[1:]
            else:
                body = orjson.dumps(payload)
        return body, meter

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        # aiohttp for the controller watch; the hot path has its own lean pool (upstream.py).
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            assert self.settings.controller_url
            self.watcher = RouteTableWatcher(self.settings.controller_url, session)
            upstreams = UpstreamPool()
            self.proxy = Proxy(self.watcher, upstreams, self.policy_for, self.metrics)
            tasks = [
                asyncio.create_task(self.watcher.run()),
                asyncio.create_task(self._watch_keys_file()),
            ]
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                # the main thread's loop only; with --processes, uvicorn restarts workers on SIGHUP
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.keys.reload)
            yield
            for task in tasks:
                task.cancel()
            upstreams.close()

    async def _watch_keys_file(self) -> None:
        while True:
            await asyncio.sleep(constants.KEYS_FILE_POLL_S)
            self.keys.reload_if_changed()


CHAT_PAGE_DIR = Path(__file__).resolve().parent / "chat"


def _build_api(gateway: Gateway) -> FastAPI:
    api = FastAPI(title="fleetserve gateway", lifespan=gateway.lifespan)
    install_error_handlers(api)
    install_openapi(api)

    def watcher() -> RouteTableWatcher:
        assert gateway.watcher is not None, "the lifespan did not run"
        return gateway.watcher

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        """Every served name and alias (those the caller's key may use, when keys are on)."""
        names = sorted(watcher().ready_by_model)
        if gateway.keys.enabled:
            key = gateway.keys.authenticate(request.headers.get("authorization"))
            names = [name for name in names if key.models is None or name in key.models]
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "fleetserve"}
            for name in names
        ]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/health")
    async def health() -> dict[str, Any]:
        table = watcher().table
        return {
            "status": "ok",
            "routing_table_version": table.version if table else None,
            "models": sorted(watcher().ready_by_model),
        }

    @api.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The chat page: static files, no build step; it calls the OpenAI API above.
    @api.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(CHAT_PAGE_DIR / "index.html")

    api.mount("/chat", StaticFiles(directory=CHAT_PAGE_DIR), name="chat")
    return api


def build_app(settings: GatewaySettings) -> Gateway:
    if not settings.controller_url:
        raise ValueError("the gateway needs a controller_url")
    return Gateway(settings)


def build_app_from_environment() -> Gateway:
    """For ``--processes N``: each uvicorn worker process builds its app from the CLI's settings."""
    return build_app(GatewaySettings.model_validate_json(os.environ[SETTINGS_ENV]))
