"""Serving one proxied OpenAI request: key, body, contract, quota, route, forward.

In order: the API key (401), the body (413 past the limit), the request contract
(400, gateway/protocol.py), one routing-table lookup (404 unknown model; 503 with
no table yet), the key's model list and rates (403, 429), the usage rewrite for
token counting (usage.py), then the proxy under the request timeout (504). Every
error becomes OpenAI's envelope through fleetserve.errors.error_response.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope

from fleetserve.config import ApiKey, GatewaySettings
from fleetserve.errors import OpenAIError, error_response
from gateway.auth import KeyStore
from gateway.kvindex import KvEvents
from gateway.metrics import NO_KEY, RequestRecord
from gateway.protocol import Endpoint, ParsedRequest, parse_request
from gateway.proxy import WORKER_HEADER, Proxy
from gateway.routing import RoutingContext
from gateway.table import RouteTableWatcher
from gateway.usage import UsageMeter

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("fleetserve.access")

# Put in front of a streaming request's JSON object to get its usage from the engine.
_INCLUDE_USAGE = b'{"stream_options":{"include_usage":true},'


def header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(
        413, f"request body is larger than {max_bytes} bytes", code="request_too_large"
    )


async def read_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    """The request body, refused with 413 past ``max_bytes`` (before reading all of it)."""
    declared = header(scope, b"content-length")
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


def metered(
    body: bytes, request: ParsedRequest, charge: functools.partial[None] | None
) -> tuple[bytes, UsageMeter]:
    """Count the answer's tokens (metrics; and ``charge`` them to a key's tokens budget).

    Streams must then carry their usage: if the client did not ask for it, ask
    the engine for ``stream_options.include_usage`` and take the usage event out
    again.
    """
    payload, stream = request.payload, request.stream
    options = payload.get("stream_options")
    asked = options is not None and options.get("include_usage") is True
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


class Serving:
    """The proxied routes' handler; one per gateway process."""

    def __init__(
        self,
        settings: GatewaySettings,
        keys: KeyStore,
        watcher: RouteTableWatcher,
        proxy: Proxy,
        kv: KvEvents | None = None,
    ) -> None:
        self.kv = kv
        self.settings = settings
        self.keys = keys
        self.watcher = watcher
        self.proxy = proxy

    async def respond(
        self, scope: Scope, receive: Receive, endpoint: Endpoint, record: RequestRecord
    ) -> Response:
        """The response to send (errors included); ``record`` learns what metrics need."""
        model = "-"
        try:
            key = (
                self.keys.authenticate(header(scope, b"authorization"))
                if self.keys.enabled
                else None
            )
            body = await read_body(scope, receive, self.settings.max_body_bytes)
            request = parse_request(body, endpoint, self.settings.max_tokens_limit)
            model = request.model
            if key is not None:
                record.key = key.name
            record.stream = request.stream
            route = self.watcher.routes.by_name.get(model)
            if route is None:
                if self.watcher.routes.version is None:
                    raise OpenAIError(
                        503,
                        "the gateway has no routing table yet: is the controller up?",
                        code="no_routing_table",
                    )
                raise OpenAIError(
                    404,
                    f"The model `{model}` does not exist.",
                    code="model_not_found",
                    param="model",
                )
            # Model names come from clients: only known ones become label values.
            record.model = model
            limits = self.keys.admit(key, model) if key is not None else {}
            charge = self._charge(key)
            body, record.meter = metered(body, request, charge)
            session = header(scope, b"x-session-id") or request.payload.get("user")
            ctx = RoutingContext(
                in_flight=self.proxy.in_flight,
                payload=request.payload,
                session=session if isinstance(session, str) else None,
                model=route.model,
                kv=self.kv,
            )
            try:
                async with asyncio.timeout(self.settings.request_timeout_s):
                    response = await self.proxy.forward(
                        route, endpoint.path, body, request.stream, ctx, record
                    )
            finally:
                record.tokenize_s = ctx.tokenize_s
            for name, value in limits.items():
                response.headers[name] = value
        except TimeoutError:
            timeout_s = self.settings.request_timeout_s
            message = f"no answer from a worker of `{model}` within {timeout_s}s"
            response = error_response(OpenAIError(504, message, code="timeout"))
        except Exception as exc:
            response = error_response(exc)
        record.status = response.status_code
        if self.settings.access_log:
            self._log_access(scope["path"], model, response, record)
        return response

    def _charge(self, key: ApiKey | None) -> functools.partial[None] | None:
        if key is None or key.tpm is None:
            return None
        return functools.partial(self.keys.charge, key)

    def _log_access(self, path: str, model: str, response: Response, record: RequestRecord) -> None:
        entry: dict[str, Any] = {
            "path": path,
            "model": model,
            "status": response.status_code,
            "worker": response.headers.get(WORKER_HEADER),
            "key": record.key if record.key != NO_KEY else None,
            "ms_to_headers": round(1000 * (time.perf_counter() - record.started), 2),
        }
        access_logger.info("%s", orjson.dumps(entry).decode())
