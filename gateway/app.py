"""The gateway's HTTP layer: OpenAI routes, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from fastapi import FastAPI, Request
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from fleetserve.config import GatewaySettings
from fleetserve.errors import OpenAIError, install_error_handlers
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.routing import RoutingPolicy
from gateway.table import RouteTableWatcher

logger = logging.getLogger(__name__)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 past ``max_bytes`` (checked before reading all of it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise OpenAIError(
            413, f"request body is larger than {max_bytes} bytes", code="request_too_large"
        )
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise OpenAIError(
                413, f"request body is larger than {max_bytes} bytes", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes, required: str) -> tuple[str, bool]:
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
    return model, payload.get("stream") is True


SETTINGS_ENV = "FLEETSERVE_GATEWAY_SETTINGS"


def build_app_from_environment() -> FastAPI:
    """For ``--processes N``: each uvicorn worker process builds its app from the CLI's settings."""
    return build_app(GatewaySettings.model_validate_json(os.environ[SETTINGS_ENV]))


def build_app(settings: GatewaySettings) -> FastAPI:
    if not settings.controller_url:
        raise ValueError("the gateway needs a controller_url")
    metrics = GatewayMetrics()
    policies: dict[str, RoutingPolicy] = {}
    default_policy = RoutingPolicy.registry[RoutingPolicy.default_name]

    def policy_for(model: str) -> RoutingPolicy:
        if model not in policies:
            policies[model] = default_policy()
        return policies[model]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One pooled client per process; no total timeout: generations can be long.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            watcher = RouteTableWatcher(settings.controller_url or "", session)
            app.state.watcher = watcher
            app.state.proxy = Proxy(watcher, session, policy_for, metrics)
            task = asyncio.create_task(watcher.run())
            yield
            task.cancel()

    app = FastAPI(title="fleetserve gateway", lifespan=lifespan)
    install_error_handlers(app)

    async def proxied(request: Request, required: str) -> Response:
        started = time.perf_counter()
        body = await read_body(request, settings.max_body_bytes)
        model, stream = parse_request(body, required)
        status = 500
        try:
            response: Response = await request.app.state.proxy.forward(
                request.url.path, body, model, stream
            )
            status = response.status_code
            return response
        except OpenAIError as exc:
            status = exc.status
            raise
        finally:
            metrics.requests.labels(model, str(status)).inc()
            logger.debug(
                "%s %s model=%s status=%d %.1fms",
                request.method,
                request.url.path,
                model,
                status,
                1000 * (time.perf_counter() - started),
            )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await proxied(request, "messages")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxied(request, "prompt")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        names = sorted(request.app.state.watcher.ready_by_model)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "fleetserve"}
            for name in names
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        watcher: RouteTableWatcher = request.app.state.watcher
        table = watcher.table
        return {
            "status": "ok",
            "routing_table_version": table.version if table else None,
            "models": sorted(watcher.ready_by_model),
        }

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
