"""Everything the gateway serves besides the hot path: a plain FastAPI app.

/v1/models, /health, /status, /metrics, the chat page, and /openapi.json, which also
describes the proxied routes (gateway/protocol.py) that never reach FastAPI.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetserve.errors import OpenAIError, install_error_handlers
from fleetserve.protocol import model_state
from gateway.protocol import (
    ENDPOINTS,
    ERRORS,
    AnthropicErrorResponse,
    Api,
    Endpoint,
    ErrorResponse,
)

if TYPE_CHECKING:
    from gateway.server import Gateway

CHAT_PAGE_DIR = Path(__file__).resolve().parent / "chat"
# The chat page runs only its own script and style and talks only to this gateway: an injected
# script could neither run nor send a pasted API key elsewhere; no framing (clickjacking), no
# type sniffing. No route sends CORS headers: other sites' pages cannot read the API.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _with_page_headers(app: ASGIApp) -> ASGIApp:
    extra = [(name.encode(), value.encode()) for name, value in PAGE_HEADERS.items()]

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await app(scope, receive, send_with_headers)

    return wrapped


def build_admin_app(
    gateway: Gateway, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]]
) -> FastAPI:
    api = FastAPI(title="fleetserve gateway", lifespan=lifespan)
    install_error_handlers(api)
    _install_openapi(api)

    def visible(request: Request) -> list[str]:
        """The served names and aliases the caller's key may use (all when keys are off)."""
        names = sorted(gateway.watcher.routes.by_name)
        if gateway.keys.enabled:
            key = gateway.keys.authenticate(
                request.headers.get("authorization"), request.headers.get("x-api-key")
            )
            names = [name for name in names if key.models is None or name in key.models]
        return names

    def model_entry(name: str) -> dict[str, Any]:
        route = gateway.watcher.routes.by_name[name]
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "fleetserve",
            # fleetserve's own: the routes the model's workers serve, and its fallbacks
            "endpoints": sorted(route.endpoints),
            "fallbacks": list(route.fallbacks),
            # ready, starting (a declared model whose replicas are not all ready yet: its
            # requests wait for one), scaled_to_zero, unavailable (kept for its fallbacks)
            "state": model_state(
                route.declared, route.replicas, len(route.workers), route.sleeping
            ),
            "replicas_ready": len(route.workers),
            "replicas": route.replicas if route.declared else len(route.workers),
            # a LoRA adapter's base model, as vLLM lists adapters
            **({"parent": route.base} if route.base is not None else {}),
        }

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        """Every served name and alias (declared models' included, ready or not), with the
        endpoints each serves and its state."""
        return JSONResponse({"object": "list", "data": [model_entry(n) for n in visible(request)]})

    @api.get(
        "/v1/models/{model:path}",
        responses={"404": {"description": ERRORS["404"], "model": ErrorResponse}},
    )
    async def model(model: str, request: Request) -> JSONResponse:
        """One served name or alias (404 if unknown, or if the key may not use it)."""
        if model not in visible(request):
            raise OpenAIError(
                404, f"The model `{model}` does not exist.", code="model_not_found", param="model"
            )
        return JSONResponse(model_entry(model))

    @api.get("/health")
    async def health() -> dict[str, Any]:
        routes = gateway.watcher.routes
        return {
            "status": "ok",
            "routing_table_version": routes.version,
            "models": sorted(routes.by_name),
        }

    @api.get("/ready", responses={"503": {"description": "No routing table yet"}})
    async def ready() -> JSONResponse:
        """200 once the gateway has a routing table from the controller, 503 before: what a
        load balancer's readiness probe asks (a gateway without one answers every request
        503)."""
        version = gateway.watcher.routes.version
        body = {"ready": version is not None, "routing_table_version": version}
        return JSONResponse(body, status_code=200 if version is not None else 503)

    @api.get("/status")
    async def status() -> dict[str, Any]:
        """This gateway's view of the workers: circuits and requests in flight."""
        return gateway.proxy.status(gateway.watcher.routes)

    @api.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The chat page: static files, no build step; it calls the OpenAI API above.
    @api.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(CHAT_PAGE_DIR / "index.html", headers=PAGE_HEADERS)

    api.mount("/chat", _with_page_headers(StaticFiles(directory=CHAT_PAGE_DIR)), name="chat")
    return api


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    envelope = AnthropicErrorResponse if endpoint.api is Api.ANTHROPIC else ErrorResponse
    error = {
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{envelope.__name__}"}}
        }
    }
    responses: dict[str, Any] = {
        "200": {
            "description": "The engine's answer, unchanged (server-sent events when streaming).",
            "content": {"application/json": {}, "text/event-stream": {}},
        }
    }
    responses.update({code: {"description": text, **error} for code, text in ERRORS.items()})
    schema = f"#/components/schemas/{endpoint.schema.__name__}"
    media = "multipart/form-data" if endpoint.multipart else "application/json"
    return {
        "post": {
            "summary": endpoint.summary,
            "operationId": endpoint.path.strip("/").replace("/", "_"),
            "requestBody": {"required": True, "content": {media: {"schema": {"$ref": schema}}}},
            "responses": responses,
            "security": [{"bearer": []}, {"api_key": []}, {}],
        }
    }


def _install_openapi(api: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            models: list[type[BaseModel]] = list({e.schema: None for e in ENDPOINTS.values()})
            models += [ErrorResponse, AnthropicErrorResponse]
            for model in models:
                defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(defs.pop("$defs", {}))
                schemas[model.__name__] = defs
            components["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "api_key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            }
            for path, endpoint in ENDPOINTS.items():
                schema["paths"][path] = _operation(endpoint)
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
