"""Serving one proxied request: key, body, contract, quota, route, forward, fall back.

In order: the API key (401; ``Authorization: Bearer`` or ``x-api-key``), the body
(413 past the limit), the request contract (400, gateway/protocol.py), one
routing-table lookup (404 unknown model; 503 with no table yet), the key's model
list and rates (403, 429), whether the model serves the endpoint (404, decided
from what its workers registered), the usage rewrite for token counting
(usage.py), then the proxy under the request timeout (504). Errors take the
envelope of the route's API (OpenAI's, or Anthropic's on /v1/messages) through
fleetserve.errors.error_response.

The body is forwarded as received unless a rewrite is needed: a fallback model's
name, an attached server's own name for the model, a response id naming the
worker (below). Then it is encoded again (``ParsedRequest.encode``).

Declared models (the controller knows they should exist): a request for one with no
ready worker serving its endpoint is held until the routing table has one
(``_hold``), up to ``hold_timeout_s`` from the request's arrival, then 503
``model_not_ready`` with Retry-After and why; the request timeout, which also runs
from the arrival, ends a hold with the same 503. Only requests that would have been
503 reach the hold: a model with ready workers costs one more truthiness test.

Fallbacks: when the model has no ready worker (503; a declared one: after the
hold), every worker tried failed before the first byte (502), or the engine
answered 429 or 503, the request goes to the model's fallbacks in turn, those
the key may use and that serve the endpoint; the answer names the model in
``x-fleetserve-model``. A stream that has started is the proxy's: it never
switches models.

Responses API state: an engine keeps the responses it made, so a request naming
a previous response (``previous_response_id``), and retrieving or cancelling one,
must reach the worker that made it, whichever gateway it comes to. vLLM takes a
client's ``request_id`` as the response's id, so the gateway picks the worker
first and mints the id with a tag naming it (``resp_<tag><random>``, see
gateway/table.py ``response_tag``); every gateway finds the worker from the id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope

from fleetserve import constants
from fleetserve.errors import OpenAIError, error_response
from fleetserve.protocol import RESPONSES
from gateway import clock
from gateway.auth import KeyStore
from gateway.kvindex import KvEvents
from gateway.metrics import NO_KEY, GatewayMetrics, RequestRecord
from gateway.protocol import (
    RESPONSES_PREFIX,
    Api,
    Endpoint,
    ParsedRequest,
    parse_form,
    parse_request,
)
from gateway.proxy import WORKER_HEADER, Proxy
from gateway.routing import RoutingContext
from gateway.settings import ApiKey, GatewaySettings
from gateway.table import ModelRoute, RouteTableWatcher, Target, response_tag
from gateway.upstream import JSON_HEADERS
from gateway.usage import UsageMeter

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("fleetserve.access")

#: The model that answered (the asked one, or a fallback).
MODEL_HEADER = "x-fleetserve-model"
_MODEL_HEADER = MODEL_HEADER.encode()
# Put in front of a streaming request's JSON object to get its usage from the engine.
_INCLUDE_USAGE = b'{"stream_options":{"include_usage":true},'
#: Engine answers that send a request to the model's fallbacks (busy or unavailable).
_FALL_BACK_STATUSES = (429, 503)
#: Gateway errors that do: no ready worker (503), every worker failed before the first byte.
_FALL_BACK_ERRORS = (502, 503)
#: Request headers of Anthropic's API that its engines read.
_ANTHROPIC_HEADERS = (b"anthropic-version", b"anthropic-beta")


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
    body: bytes,
    request: ParsedRequest,
    endpoint: Endpoint,
    charge: functools.partial[None] | None,
) -> tuple[bytes, UsageMeter]:
    """Count the answer's tokens (metrics; and ``charge`` them to a key's tokens budget).

    Chat and completion streams carry their usage only when asked: if the client
    did not ask for it, ask the engine for ``stream_options.include_usage`` and
    take the usage event out again.
    """
    payload, stream = request.payload, request.stream
    if not (stream and endpoint.stream_usage_option):
        return body, UsageMeter(charge)
    options = payload.get("stream_options")
    asked = options is not None and options.get("include_usage") is True
    meter = UsageMeter(charge, strip=not asked)
    if not asked:
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


@dataclass(slots=True)
class Call:
    """One request on its way to an engine: what every attempt (and fallback) sends."""

    endpoint: Endpoint
    request: ParsedRequest
    #: The body as received (or with the usage option added: see ``metered``).
    body: bytes
    #: Its header lines for the engine (gateway/upstream.py).
    headers: bytes
    ctx: RoutingContext
    record: RequestRecord
    #: While held (Serving._hold): the route waited for and since when (gateway/clock.py).
    hold: tuple[ModelRoute, float] | None = None


def _request_headers(scope: Scope, endpoint: Endpoint) -> bytes:
    """The header lines to send the engine of a form or of Anthropic's API: the body's type,
    and the headers Anthropic's engines read."""
    if endpoint.multipart:
        return b"Content-Type: " + (header(scope, b"content-type") or "").encode() + b"\r\n"
    lines = [JSON_HEADERS]
    for name, value in scope["headers"]:
        if name in _ANTHROPIC_HEADERS:
            lines.append(name + b": " + value + b"\r\n")  # (an HTTP parser let no CR/LF in)
    return b"".join(lines)


class Serving:
    """The proxied routes' handler; one per gateway process."""

    def __init__(
        self,
        settings: GatewaySettings,
        keys: KeyStore,
        watcher: RouteTableWatcher,
        proxy: Proxy,
        metrics: GatewayMetrics,
        kv: KvEvents | None = None,
    ) -> None:
        self.kv = kv
        self.settings = settings
        self.keys = keys
        self.watcher = watcher
        self.proxy = proxy
        self.metrics = metrics

    def _authenticate(self, scope: Scope) -> ApiKey:
        return self.keys.authenticate(header(scope, b"authorization"), header(scope, b"x-api-key"))

    def _unknown(self, model: str) -> OpenAIError:
        if self.watcher.routes.version is None:
            return OpenAIError(
                503,
                "the gateway has no routing table yet: is the controller up?",
                code="no_routing_table",
                headers={"Retry-After": str(constants.HOLD_RETRY_AFTER_S)},
            )
        return OpenAIError(
            404, f"The model `{model}` does not exist.", code="model_not_found", param="model"
        )

    @staticmethod
    def _unsupported(model: str, path: str, route: ModelRoute) -> OpenAIError:
        return OpenAIError(
            404,
            f"The model `{model}` does not serve {path}; it serves "
            f"{', '.join(sorted(route.endpoints))}.",
            code="unsupported_endpoint",
            param="model",
        )

    async def respond(
        self, scope: Scope, receive: Receive, endpoint: Endpoint, record: RequestRecord
    ) -> Response:
        """The response to send (errors included); ``record`` learns what metrics need."""
        model = "-"
        call: Call | None = None
        # (the chat path is the hot path: helpers are called only where it needs them)
        try:
            key = self._authenticate(scope) if self.keys.enabled else None
            if endpoint.multipart:
                body = await read_body(scope, receive, self.settings.max_audio_body_bytes)
                request = parse_form(body, header(scope, b"content-type"))
            else:
                body = await read_body(scope, receive, self.settings.max_body_bytes)
                request = parse_request(body, endpoint, self.settings.max_tokens_limit)
            model = request.model
            if key is not None:
                record.key = key.name
            record.stream = request.stream
            route = self.watcher.routes.by_name.get(model)
            if route is None:
                route = await self._first_table(model, record)
            # Model names come from clients: only known ones become label values.
            record.model = model
            served = route.by_endpoint.get(endpoint.path)
            if served is None and route.endpoints:
                raise self._unsupported(model, endpoint.path, route)
            limits = self.keys.admit(key, model) if key is not None else {}
            body, record.meter = metered(body, request, endpoint, self._charge(key))
            session = header(scope, b"x-session-id") or request.payload.get("user")
            ctx = RoutingContext(
                in_flight=self.proxy.in_flight,
                payload=request.payload,
                session=session if isinstance(session, str) else None,
                model=route.model,
                kv=self.kv,
            )
            headers = (
                JSON_HEADERS
                if endpoint.api is Api.OPENAI and not endpoint.multipart
                else _request_headers(scope, endpoint)
            )
            call = Call(endpoint, request, body, headers, ctx, record)
            try:
                async with asyncio.timeout(self.settings.request_timeout_s):
                    if served is not None and served.workers and not route.fallbacks:
                        response = await self._send(served, route.engine_name(model), call)
                    else:
                        response = await self._with_fallbacks(route, served, key, call)
            finally:
                record.tokenize_s = call.ctx.tokenize_s
            for name, value in limits.items():
                response.headers[name] = value
        except TimeoutError:
            timeout_s = self.settings.request_timeout_s
            message = f"no answer from a worker of `{model}` within {timeout_s}s"
            error = OpenAIError(504, message, code="timeout")
            if call is not None and call.hold is not None:  # the timeout ended a hold
                error = self._not_ready(*call.hold)
            response = error_response(error, anthropic=endpoint.api is Api.ANTHROPIC)
        except Exception as exc:
            response = error_response(exc, anthropic=endpoint.api is Api.ANTHROPIC)
        record.status = response.status_code
        if self.settings.access_log:
            self._log_access(scope["path"], model, response, record)
        return response

    async def _with_fallbacks(
        self, route: ModelRoute, served: ModelRoute | None, key: ApiKey | None, call: Call
    ) -> Response:
        """The model's answer, or its first fallback's that can give one."""
        failure: Response | OpenAIError
        try:
            if route.declared and (served is None or not served.workers):
                served = await self._hold(route, call)
            if served is None:  # a model with no worker left, kept for its fallbacks
                raise self._no_worker(route.model)
            response = await self._send(served, route.engine_name(call.request.model), call)
            if response.status_code not in _FALL_BACK_STATUSES or not route.fallbacks:
                return response
            failure = response
        except OpenAIError as exc:
            if exc.status not in _FALL_BACK_ERRORS or not route.fallbacks:
                raise
            failure = exc
        for name in route.fallbacks:
            fallback = self._fallback(name, key, call.endpoint)
            if fallback is None:
                continue
            self.metrics.fallbacks.inc((route.model, fallback.model))
            logger.info(
                "%s could not answer (%s): trying %s",
                route.model,
                failure.status_code if isinstance(failure, Response) else failure.message,
                fallback.model,
            )
            try:
                response = await self._send(fallback, fallback.model, call)
            except OpenAIError as exc:
                if exc.status not in _FALL_BACK_ERRORS:
                    raise
                failure = exc
                continue
            if response.status_code in _FALL_BACK_STATUSES:
                failure = response
                continue
            call.record.model = fallback.model  # quotas and metrics: the model that answered
            return response
        if isinstance(failure, OpenAIError):
            raise failure
        return failure

    def _hold_deadline(self, record: RequestRecord) -> float:
        """When holding a request ends (gateway/clock.py): hold_timeout_s after its arrival
        (``record.arrived``), or at its request timeout, which runs from then too, if
        earlier (respond() also ends a hold at the request timeout: see Call.hold)."""
        deadline = record.arrived + self.settings.hold_timeout_s
        timeout_s = self.settings.request_timeout_s
        return deadline if timeout_s is None else min(deadline, record.arrived + timeout_s)

    async def _table_changed(self, deadline: float) -> bool:
        """Wait for the next routing table until ``deadline``; False if none came."""
        remaining = deadline - clock.now()
        if remaining <= 0:
            return False
        try:
            async with asyncio.timeout(remaining):
                await self.watcher.changed.wait()
        except TimeoutError:  # (the clock may stop a hair short of the deadline: it is past)
            return False
        return True

    async def _first_table(self, model: str, record: RequestRecord) -> ModelRoute:
        """``model``'s route once the gateway has a table (a gateway starting with its
        cluster has none for its first seconds: the request waits, up to hold_timeout_s);
        404 when it is unknown, 503 when no table came."""
        deadline = self._hold_deadline(record)
        while self.watcher.routes.version is None and await self._table_changed(deadline):
            pass
        route = self.watcher.routes.by_name.get(model)
        if route is None:
            raise self._unknown(model)
        return route

    async def _hold(self, route: ModelRoute, call: Call) -> ModelRoute | None:
        """Hold a request for declared ``route`` until a worker serving its endpoint is
        ready: the route narrowed to the endpoint then; 503 with Retry-After saying why when
        none is by _hold_deadline; 404 if the model is gone or its workers
        do not serve the endpoint; as an undeclared model if it stops being declared."""
        name, path, model = call.request.model, call.endpoint.path, route.model
        started = clock.now()
        deadline = self._hold_deadline(call.record)  # (it may have waited for a first table)
        held = self.metrics.held
        held[model] = held.get(model, 0) + 1
        outcome = "timed_out"
        cancelled = False
        logger.debug("holding a request for %s: no ready worker yet", model)
        try:
            while True:
                current = self.watcher.routes.by_name.get(name)
                if current is None:
                    outcome = "gone"
                    raise self._unknown(name)
                route = current
                call.hold = (route, started)
                if not route.declared:  # no longer: as any model (its fallbacks, or 503)
                    outcome = "gone"
                    return route.by_endpoint.get(path)
                served = route.by_endpoint.get(path)
                if served is not None and served.workers:
                    outcome = "ready"
                    return served
                if not route.replicas or route.sleeping:  # scaled to zero or asleep: ask
                    self.watcher.demand(model)
                if served is None and route.endpoints:
                    outcome = "gone"
                    raise self._unsupported(name, path, route)
                if not await self._table_changed(deadline):
                    raise self._not_ready(route, started)
        except asyncio.CancelledError:
            cancelled = True  # by the request timeout: respond() answers from call.hold
            raise
        finally:
            if not cancelled:
                call.hold = None
            held[model] -= 1
            self.metrics.holds.observe((model, outcome), clock.now() - started)

    @staticmethod
    def _not_ready(route: ModelRoute, held_since: float) -> OpenAIError:
        waited_s = clock.now() - held_since
        ready = len(route.workers)
        if route.base is not None:
            why = f"a LoRA adapter of `{route.base}`, not registered on a replica yet"
        elif route.sleeping:
            why = f"asleep: waking {route.sleeping} replica(s)"
        elif route.replicas:
            why = f"starting: {ready} of {route.replicas} replicas ready"
        else:
            why = "scaled to zero: no replica running"
        if route.note:
            why += f"; {route.note}"
        return OpenAIError(
            503,
            f"The model `{route.model}` is not ready ({why}); waited {waited_s:.1f}s. "
            f"Try again in {constants.HOLD_RETRY_AFTER_S}s.",
            code="model_not_ready",
            headers={"Retry-After": str(constants.HOLD_RETRY_AFTER_S)},
        )

    def _fallback(self, name: str, key: ApiKey | None, endpoint: Endpoint) -> ModelRoute | None:
        """The route of fallback ``name`` for ``endpoint``; None where the key may not use it or
        it does not serve the endpoint (a model kept only for its own fallbacks serves none:
        fallbacks are one level deep)."""
        if key is not None and key.models is not None and name not in key.models:
            return None
        route = self.watcher.routes.by_name.get(name)
        return route.by_endpoint.get(endpoint.path) if route is not None else None

    @staticmethod
    def _no_worker(model: str) -> OpenAIError:
        return OpenAIError(
            503,
            f"no healthy worker for model `{model}` right now; try again shortly",
            code="no_healthy_worker",
        )

    async def _send(self, route: ModelRoute, name: str, call: Call) -> Response:
        """Forward to a worker of ``route``, whose engines know the model as ``name``; the
        answer names the model (``MODEL_HEADER``)."""
        path, request, body = call.endpoint.path, call.request, call.body
        if call.ctx.model != route.model:  # a fallback: its policy reads its own tokenizer
            call.ctx = dataclasses.replace(call.ctx, model=route.model)
        # the usual case: every worker takes the same bytes
        if path != RESPONSES and not route.upstreams:
            if name != request.payload.get("model"):  # a fallback
                body = request.encode(body, model=name)
            response = await self.proxy.forward(
                route, path, body, request.stream, call.ctx, call.record, call.headers
            )
        else:
            response = await self._pick_then_forward(route, name, call)
        response.raw_headers.append((_MODEL_HEADER, route.model.encode()))
        return response

    async def _pick_then_forward(self, route: ModelRoute, name: str, call: Call) -> Response:
        """Pick a worker first: what it needs decides the bytes (an attached server's name and
        key; a response id naming it); then forward to it and those that take the same bytes."""
        path, request, body = call.endpoint.path, call.request, call.body
        pinned = path == RESPONSES
        candidates = route.workers
        previous = request.payload.get("previous_response_id") if pinned else None
        if isinstance(previous, str) and previous:
            candidates = (self._stored(previous, "previous_response_id", route)[1],)
        tried: set[str] = set()
        failure: OpenAIError = self._no_worker(route.model)
        for _ in range(constants.MAX_ATTEMPTS):
            pool = [t for t in candidates if t.worker_id not in tried]
            if not pool:
                break
            target = route.policy.pick(pool, call.ctx)
            upstream = route.upstreams.get(target.worker_id)
            group = (
                (target,)
                if pinned
                else tuple(t for t in pool if route.upstreams.get(t.worker_id) == upstream)
            )
            fields: dict[str, str] = {}
            wanted = upstream.model if upstream and upstream.model else name
            if wanted != request.payload.get("model"):
                fields["model"] = wanted
            if pinned:
                fields["request_id"] = f"resp_{response_tag(target.worker_id)}{uuid.uuid4().hex}"
            try:
                return await self.proxy.forward(
                    dataclasses.replace(route, workers=group),
                    path,
                    request.encode(body, **fields) if fields else body,
                    request.stream,
                    call.ctx,
                    call.record,
                    call.headers + upstream.headers if upstream else call.headers,
                )
            except OpenAIError as exc:
                if exc.status not in _FALL_BACK_ERRORS:
                    raise
                failure = exc
                tried.update(t.worker_id for t in group)
        raise failure

    def _stored(
        self, response_id: str, param: str, route: ModelRoute | None = None
    ) -> tuple[ModelRoute, Target]:
        """The worker that stored response ``response_id`` (of ``route``'s model, if given);
        404 when no worker of this cluster made it or that worker is gone."""
        found = self.watcher.routes.by_response_tag.get(response_id[5:17])
        if found is None or not response_id.startswith("resp_"):
            raise OpenAIError(
                404,
                f"Response with id '{response_id}' not found (no worker has it: it was not made "
                "here, or the worker that made it is gone).",
                code="response_not_found",
                param=param,
            )
        if route is not None and found[0].model != route.model:
            raise OpenAIError(
                400,
                f"Response '{response_id}' was made by model `{found[0].model}`, not "
                f"`{route.model}`.",
                code="invalid_value",
                param=param,
            )
        return found

    async def respond_stored(
        self, scope: Scope, receive: Receive, record: RequestRecord
    ) -> Response:
        """GET /v1/responses/{id} and POST /v1/responses/{id}/cancel: to the worker that has it."""
        model = "-"
        try:
            response_id, _, action = scope["path"][len(RESPONSES_PREFIX) :].partition("/")
            method = scope["method"]
            if not response_id or (method, action) not in (("GET", ""), ("POST", "cancel")):
                raise OpenAIError(404, "Not Found", code="not_found")
            key = self._authenticate(scope) if self.keys.enabled else None
            if key is not None:
                record.key = key.name
            await read_body(scope, receive, self.settings.max_body_bytes)  # none expected
            route, target = self._stored(response_id, "response_id")
            model = record.model = route.model
            limits = self.keys.admit(key, model) if key is not None else {}
            query = scope.get("query_string", b"").decode("latin-1")
            record.stream = method == "GET" and "stream=true" in query.lower()
            path = scope["path"] + (f"?{query}" if query else "")
            upstream = route.upstreams.get(target.worker_id)
            async with asyncio.timeout(self.settings.request_timeout_s):
                response = await self.proxy.forward(
                    dataclasses.replace(route, workers=(target,)),
                    path,
                    b"",
                    record.stream,
                    RoutingContext(in_flight=self.proxy.in_flight),
                    record,
                    JSON_HEADERS + upstream.headers if upstream else JSON_HEADERS,
                    method,
                )
            for name, value in limits.items():
                response.headers[name] = value
        except TimeoutError:
            timeout_s = self.settings.request_timeout_s
            message = f"no answer from the worker of the response within {timeout_s}s"
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
            "answered_by": response.headers.get(MODEL_HEADER),
            "status": response.status_code,
            "worker": response.headers.get(WORKER_HEADER),
            "key": record.key if record.key != NO_KEY else None,
            "ms_to_headers": round(1000 * (time.perf_counter() - record.started), 2),
        }
        access_logger.info("%s", orjson.dumps(entry).decode())
