"""The gateway process: its ASGI entry point and what it owns for its lifetime.

The proxied routes (gateway/protocol.py) are the hot path: they are served
straight from ASGI (no framework routing, middleware or validation layers) by
gateway/serving.py, and so are the routes of a stored response (Responses API).
Everything else is the FastAPI app of gateway/admin.py behind it. The lifespan
opens the routing-table watch, the engines' connection pool and the keys-file
poll, and closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from fleetserve import constants, env
from fleetserve.auth import client_tls, client_token
from fleetserve.errors import OpenAIError, error_response
from gateway import clock
from gateway.admin import build_admin_app
from gateway.auth import KeyStore
from gateway.kvindex import KvEvents
from gateway.metrics import GatewayMetrics, RequestRecord
from gateway.protocol import ENDPOINTS, RESPONSES_PREFIX
from gateway.proxy import Proxy
from gateway.serving import Serving
from gateway.settings import GatewaySettings
from gateway.table import RouteTableWatcher
from gateway.upstream import UpstreamPool

logger = logging.getLogger(__name__)

#: Paths of Anthropic's API: those the gateway does not route get Anthropic's 404.
MESSAGES_PREFIX = "/v1/messages"


class Gateway:
    """ASGI entry point: the proxied OpenAI routes, then the admin app for the rest."""

    def __init__(self, settings: GatewaySettings) -> None:
        if not settings.controller_url:
            raise ValueError("the gateway needs a controller_url")
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.keys = KeyStore(
            settings.keys, Path(settings.keys_file) if settings.keys_file else None, clock.now
        )
        if not self.keys.enabled:
            logger.warning(
                "NO API KEYS CONFIGURED: the gateway is open to anyone who can reach port %d "
                "(give it keys with --keys-file or gateway.keys in the cluster file)",
                settings.port,
            )
        # The watcher's HTTP session is opened by the lifespan; until then it has no table.
        self.watcher = RouteTableWatcher(
            settings.controller_url,
            session=None,
            token=client_token(settings.cluster_token_file),
            secrets_dir=settings.secrets_dir,
            default_policy=settings.routing_policy,
        )
        self.upstreams = UpstreamPool()
        self.proxy = Proxy(self.upstreams, self.metrics, settings, lambda: self.watcher.routes)
        # the engines' KV caches, from their events (kv_events policy)
        self.kv = KvEvents(clock.now)
        self.metrics.registry.register(self.kv)
        self.watcher.listeners.append(self.kv.update)
        self.serving = Serving(settings, self.keys, self.watcher, self.proxy, self.metrics, self.kv)
        self.admin = build_admin_app(self, self.lifespan)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            endpoint = ENDPOINTS.get(path) if scope["method"] == "POST" else None
            if endpoint is not None:
                record = RequestRecord(time.perf_counter(), clock.now())
                response = await self.serving.respond(scope, receive, endpoint, record)
            elif path.startswith(RESPONSES_PREFIX):
                record = RequestRecord(time.perf_counter(), clock.now())
                response = await self.serving.respond_stored(scope, receive, record)
            elif path == MESSAGES_PREFIX or path.startswith(MESSAGES_PREFIX + "/"):
                # Anthropic's API, a path or method not routed: its own 404
                error = OpenAIError(404, f"{scope['method']} {path} is not served here")
                await error_response(error, anthropic=True)(scope, receive, send)
                return
            else:
                await self.admin(scope, receive, send)
                return
            try:
                await response(scope, receive, send)
            finally:
                self.metrics.record(record, time.perf_counter())
            return
        await self.admin(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        # aiohttp for the controller watch; the hot path has its own lean pool (upstream.py).
        connector = aiohttp.TCPConnector(
            limit=0, ttl_dns_cache=300, ssl=client_tls(self.settings.ca_file)
        )
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            self.watcher.session = self.kv.session = session
            tasks = [
                asyncio.create_task(self.watcher.run()),
                asyncio.create_task(self._watch_keys_file()),
            ]
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                # the main thread's loop only; with --processes, uvicorn restarts workers on SIGHUP
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.keys.reload)
            try:
                yield
            finally:  # also when the app fails: no task may outlive the session it uses
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self.kv.close()
                self.upstreams.close()

    async def _watch_keys_file(self) -> None:
        while True:
            await asyncio.sleep(constants.KEYS_FILE_POLL_S)
            self.keys.reload_if_changed()


def build_app(settings: GatewaySettings) -> Gateway:
    return Gateway(settings)


def build_app_from_environment() -> Gateway:
    """For ``--processes N``: each uvicorn worker process builds its app from the CLI's settings."""
    return build_app(GatewaySettings.model_validate_json(env.gateway_settings()))
