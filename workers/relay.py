"""The engine's relay: the one way in to an engine, for whoever holds its secret.

An engine's own key is not enough: vLLM's ``--api-key`` guards only paths under /v1, /v2,
/inference and /cohere (vLLM 0.32, entrypoints/serve/middleware/authenticate.py), so
``POST /invocations`` generates, and /tokenize, /pooling, /score, /rerank and /metrics
answer, without it. So the engine listens on a Unix socket in a directory only this user
may enter (0700), and the agent serves this relay on the worker's address: it checks
``Authorization: Bearer SECRET`` on every request of every connection (constant time)
before a byte of it reaches the engine, answers 401 in the error envelope otherwise, and
forwards the requests that carry it. ``GET /health`` alone passes without it, as on every
fleetserve server: it says only that the engine is up, and probes and other routers
(sglang-router checks a worker's /health without its key before it routes to it) need it.
The secret is the worker's own (new for each agent),
registered with the controller under the cluster token and handed only to gateways, on the
controller's authenticated /routes; the engine gets it too (VLLM_API_KEY, LLAMA_API_KEY),
through its environment.

A byte relay, not a proxy: request heads are parsed (httptools, as uvicorn does) to check
each one, then bodies and answers pass through as they arrive, keep-alive on both sides;
answers are parsed only to know when a connection is idle. HEAD is refused (an answer to
it has no body, which a parser cannot tell from the answer alone), and so is CONNECT.
Limits as on every fleetserve server (fleetserve/http.py): the head's deadline and size
cap, idle connections cut, a connection cap that evicts idle ones first. Bodies need no
deadline here: only holders of the secret (gateways, which have their own) get past the head.
What the extra hop costs: README, Performance.

Routes only the agent may call are refused to everyone, the secret's holders included
(403; AGENT_ONLY_PATHS): vLLM's runtime LoRA endpoints and the SageMaker ``/adapters``
routes vLLM 0.32 also serves (they register any path on the engine's disk;
workers/adapters.py), and the dev routes ``VLLM_SERVER_DEV_MODE=1`` opens for sleep mode
(/sleep, /wake_up, /is_sleeping, /release_kv_cache_memory, and with them /collective_rpc,
which calls any method on the engine's workers, and /server_info; workers/sleep.py). The
agent talks to the engine's socket itself. The cache resets of the dev set pass with the
secret: they cost only cache hits, and bench/routing.py empties the engines' prefix caches
through the relay.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import typing
from urllib.parse import unquote

import httptools

from fleetserve import constants
from fleetserve.auth import bearer_value
from fleetserve.http import (
    ConnectionSlots,
    Deadline,
    HttpLimits,
    close,
    connection_cap,
    head_timeout,
    refusal,
)

logger = logging.getLogger(__name__)


#: Routes only the agent calls (through the engine's socket), as vLLM 0.32's router matches
#: them, on the percent-decoded path: its dev routes (entrypoints/serve/dev/: sleep mode and
#: more) and runtime LoRA loading, with SageMaker's routes for the same (POST /adapters loads
#: any path on the engine's disk).
AGENT_ONLY_PATHS = frozenset(
    {
        "/sleep",
        "/wake_up",
        "/is_sleeping",
        "/release_kv_cache_memory",
        "/collective_rpc",
        "/server_info",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/adapters",
    }
)


def _agent_only(url: bytes) -> bool:
    """Whether ``url`` (a request target) names a route of AGENT_ONLY_PATHS (or below
    /adapters/). Cheap for the routes gateways use: a plain /v1/ path without "lora"."""
    if url.startswith(b"/v1/") and b"lora" not in url and b"%" not in url:
        return False
    try:
        path = httptools.parse_url(url).path or b"/"
    except httptools.HttpParserInvalidURLError:
        return True  # (the engine's server would refuse it too)
    decoded = unquote(path.decode("latin-1")).rstrip("/")
    return decoded in AGENT_ONLY_PATHS or decoded.startswith("/adapters/")


class _Refused(Exception):
    """Raised in a parser callback to stop parsing what follows a refused request."""


class EngineRelay:
    """Listens on the worker's address; forwards requests carrying ``secret`` to the engine."""

    def __init__(self, secret: str, engine_socket: str, limits: HttpLimits) -> None:
        self._secret = secret.encode()
        self.engine_socket = engine_socket
        self.limits = limits
        self.slots = ConnectionSlots(connection_cap(limits))
        self.connections: set[_Inbound] = set()
        self._server: asyncio.Server | None = None

    def authorized(self, value: bytes) -> bool:
        given = bearer_value(value.decode("latin-1"))
        return given is not None and hmac.compare_digest(given, self._secret)

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host``:``port`` (0: a free one); the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Inbound(self), host, port, backlog=1024)
        port = int(self._server.sockets[0].getsockname()[1])
        logger.info("engine relay on %s:%d (the engine: %s)", host, port, self.engine_socket)
        return port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection.evict()
        await self._server.wait_closed()


class _Inbound(asyncio.Protocol):
    """A client's connection (a gateway's): checks each request's head, forwards the rest."""

    def __init__(self, relay: EngineRelay) -> None:
        self.relay = relay
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.engine: _Outbound | None = None
        self.deadline = Deadline(self.loop)
        self.in_head = True
        self.head_bytes = 0
        self.url = b""
        self.lines: list[bytes] = []
        self.authorized = False
        self.chunked = False
        self.has_body = False
        self.outstanding = 0  # requests forwarded whose answers are not complete
        self.tunnel = False  # switched protocols (WebSocket): bytes pass as they are
        self.refused = False

    # -- timers and endings --------------------------------------------------------

    def _head_too_slow(self) -> None:
        self.end(head_timeout(self.relay.limits), linger=False)

    def evict(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def refuse(self, status: int, message: str, code: str) -> None:
        """Answer ``status`` and close, dropping what still arrives for a moment."""
        self.end(refusal(status, message, code), linger=True)

    def end(self, last: bytes, linger: bool) -> None:
        self.refused = True
        self.deadline.cancel()
        assert self.transport is not None
        close(self.transport, last, linger)
        if self.engine is not None and self.engine.transport is not None:
            self.engine.transport.close()

    # -- the client's side ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        self.relay.connections.add(self)
        self.deadline.set(self.relay.limits.header_timeout_s, self._head_too_slow, "head")
        self.relay.slots.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline.cancel()
        self.relay.connections.discard(self)
        self.relay.slots.closed(self)
        if self.engine is not None and self.engine.transport is not None:
            self.engine.transport.close()  # the engine sees the client leave: it aborts

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # lingering: dropped
        if self.tunnel:
            self.forward(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:  # the head was checked and forwarded
            self.tunnel = True
            self.forward(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError:
            if not self.refused:
                self.refuse(400, "invalid HTTP request", "invalid_request")
            return
        if self.in_head and not self.refused:  # counted per read, as in fleetserve/http.py
            self.head_bytes += len(data)
            limit = self.relay.limits.max_header_bytes
            if self.head_bytes > limit:
                self.refuse(431, f"request headers larger than {limit} bytes", "headers_too_large")

    def pause_writing(self) -> None:  # the client reads slower than the engine writes
        if self.engine is not None and self.engine.transport is not None:
            self.engine.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.engine is not None and self.engine.transport is not None:
            self.engine.transport.resume_reading()

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.lines = []
        self.authorized = self.chunked = self.has_body = False
        if self.deadline.what != "head":  # a kept-alive connection's next request
            self.deadline.set(self.relay.limits.header_timeout_s, self._head_too_slow, "head")

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.lines.append(name + b": " + value + b"\r\n")
        lower = name.lower()
        if lower == b"authorization":
            self.authorized |= self.relay.authorized(value)
        elif lower == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = self.has_body = True
        elif lower == b"content-length" and value.strip() != b"0":
            self.has_body = True

    def _open_health_check(self, method: bytes) -> bool:
        """``GET /health`` without a body: the one request that needs no secret (a body would
        let an unauthenticated client hold the connection: bodies have no deadline here)."""
        return method == b"GET" and self.url == b"/health" and not self.has_body

    def on_headers_complete(self) -> None:
        self.deadline.cancel()
        self.in_head = False
        self.head_bytes = 0
        method = self.parser.get_method()
        if not (self.authorized or self._open_health_check(method)):
            self.refuse(401, "this engine answers its gateways only", "invalid_engine_secret")
            raise _Refused
        if method in (b"HEAD", b"CONNECT"):
            self.refuse(405, f"{method.decode()} is not relayed", "method_not_allowed")
            raise _Refused
        if _agent_only(self.url):
            self.refuse(403, "this engine route is the worker's own", "engine_route_forbidden")
            raise _Refused
        self.outstanding += 1
        self.relay.slots.busy(self)
        version = self.parser.get_http_version().encode()
        self.forward(b"%s %s HTTP/%s\r\n%s\r\n" % (method, self.url, version, b"".join(self.lines)))

    def on_body(self, body: bytes) -> None:
        # httptools hands over a chunked body without its framing: framed again here
        self.forward(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.forward(b"0\r\n\r\n")
        self.in_head = True

    # -- towards the engine ----------------------------------------------------------------

    def forward(self, data: bytes) -> None:
        engine = self.engine
        if engine is None:  # the first request, or the engine closed the last idle connection
            self.engine = engine = _Outbound(self)
            self.loop.create_task(engine.connect(self.relay.engine_socket))
        if engine.transport is None:
            engine.pending.append(data)
        else:
            engine.transport.write(data)

    def answered(self) -> None:
        """An answer is complete; with none under way, idle until the keep-alive timeout."""
        self.outstanding -= 1
        if self.outstanding == 0 and self.in_head:
            self.relay.slots.rest(self)
            if self.deadline.what is None:
                self.deadline.set(constants.RELAY_KEEP_ALIVE_S, self.evict, "keep-alive")


class _Outbound(asyncio.Protocol):
    """The relay's connection to the engine's socket, for one client connection."""

    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)
        self.tunnel = False

    async def connect(self, path: str) -> None:
        try:
            await asyncio.get_running_loop().create_unix_connection(lambda: self, path)
        except OSError as exc:
            logger.warning("cannot reach the engine at %s: %s", path, exc)
            if self.inbound.transport is not None and not self.inbound.transport.is_closing():
                self.inbound.refuse(502, "the engine is not answering", "upstream_error")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        engine = self.transport = typing.cast(asyncio.Transport, transport)
        inbound = self.inbound.transport
        if inbound is None or inbound.is_closing():
            engine.close()
            return
        engine.write(b"".join(self.pending))
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        inbound = self.inbound.transport
        if inbound is None or inbound.is_closing():
            return
        inbound.write(data)
        if not self.tunnel:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self.tunnel = True
            except httptools.HttpParserError as exc:  # keep relaying, stop keeping count
                logger.warning("engine answered invalid HTTP (%s): relaying it as is", exc)
                self.tunnel = True

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if not 100 <= status < 200:  # an interim answer (100 Continue) is not the answer
            self.inbound.answered()

    def connection_lost(self, exc: Exception | None) -> None:
        inbound = self.inbound
        if inbound.engine is self:
            inbound.engine = None
        if inbound.transport is not None and (inbound.outstanding or self.tunnel or self.pending):
            inbound.transport.close()  # an answer was cut short: the client must see it
        # else the engine closed an idle connection (its keep-alive): the next request reopens

    def pause_writing(self) -> None:  # the engine reads an upload slower than it arrives
        if self.inbound.transport is not None:
            self.inbound.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.inbound.transport is not None:
            self.inbound.transport.resume_reading()
