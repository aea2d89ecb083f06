"""fleetserve's HTTP servers: uvicorn with the limits it lacks.

uvicorn (0.55, httptools) has no deadline for a request's head and no cap on its size:
a 1 MB header was answered 200, and a connection that sends nothing, or one byte a
second, was held forever. Every server fleetserve runs (gateway, controller, the agent's
status server, the fake engine) goes through :func:`serve` or :func:`make_server`, whose
protocol, :class:`LimitedHttpToolsProtocol`, adds (limits from :class:`HttpLimits`):

- a head deadline: the request line and headers within ``header_timeout_s`` of the
  connection opening (or of their first byte on a kept-alive connection), else 408 and
  closed; between requests uvicorn's keep-alive timeout closes idle connections;
- a head size cap: over ``max_header_bytes``, 431, then the rest is read and dropped for
  a moment (closing with unread data would reset the connection before the client reads
  the answer);
- a body deadline that grows with what arrives (Apache's mod_reqtimeout): a slow link gets
  time, a trickle is cut;
- a write stall cut: a client that reads nothing of its answer for a minute;
- a connection limit that never starves real clients: past ``max_connections`` the oldest
  idle connection (waiting for a request, or kept alive between two) is closed to make
  room; only when none is idle is the new one refused (:class:`ConnectionSlots`).

The engines' relay (workers/relay.py) applies the same limits with the same slots.
What this costs the hot path: two timers per request (scheduled and cancelled in the
event loop, a microsecond each) and a dictionary update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from fleetserve import constants
from fleetserve.errors import error_body

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    header_timeout_s: float = constants.HEADER_TIMEOUT_S
    max_header_bytes: int = constants.MAX_HEADER_BYTES
    max_connections: int = constants.MAX_CONNECTIONS
    body_timeout_s: float = constants.BODY_TIMEOUT_S
    body_min_bytes_per_s: float = constants.BODY_MIN_BYTES_PER_S
    write_stall_timeout_s: float = constants.WRITE_STALL_TIMEOUT_S

    @classmethod
    def of(cls, settings: Any) -> HttpLimits:
        """The limits a process's settings give (their ``header_timeout_s``, ...)."""
        return cls(
            header_timeout_s=settings.header_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            max_connections=settings.max_connections,
        )


def raise_open_files_limit() -> int:
    """Raise this process's open-files limit to its hard limit (Go does the same at start:
    the soft default, often 1024, is a connection limit nobody chose); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def connection_cap(limits: HttpLimits) -> int:
    """``max_connections``, at most half the open-files limit (see constants.MAX_CONNECTIONS)."""
    return max(1, min(limits.max_connections, raise_open_files_limit() // 2))


class Evictable(Protocol):
    def evict(self) -> None: ...


class ConnectionSlots:
    """The connections of one server: how many, and which are idle, oldest first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.idle: dict[Evictable, None] = {}
        self.evicted = 0
        self._warned_at = 0.0

    def opened(self, connection: Evictable) -> None:
        """A new connection (idle until its request's head arrives); makes room past the limit."""
        self.count += 1
        self.idle[connection] = None
        if self.count <= self.limit:
            return
        victim = next((c for c in self.idle if c is not connection), connection)
        self.idle.pop(victim)
        self.evicted += 1
        if time.monotonic() - self._warned_at > 60:
            self._warned_at = time.monotonic()
            logger.warning(
                "%d connections (the limit): %s (%d so far)",
                self.count,
                "closing the oldest idle one"
                if victim is not connection
                else "all busy, refusing new ones",
                self.evicted,
            )
        victim.evict()

    def busy(self, connection: Evictable) -> None:
        self.idle.pop(connection, None)

    def rest(self, connection: Evictable) -> None:
        """Idle again (newest now)."""
        self.idle.pop(connection, None)
        self.idle[connection] = None

    def closed(self, connection: Evictable) -> None:
        self.count -= 1
        self.idle.pop(connection, None)


def refusal(status: int, message: str, code: str | None = None) -> bytes:
    """A whole HTTP/1.1 answer in the error envelope that closes the connection: for what is
    refused before any app sees the request."""
    body = orjson.dumps(error_body(status, message, code))
    head = STATUS_LINE[status] + (
        b"content-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )
    return head + body


def head_timeout(limits: HttpLimits) -> bytes:
    """The 408 for a request whose line and headers did not arrive in time."""
    timeout_s = limits.header_timeout_s
    message = f"the request's line and headers did not arrive within {timeout_s:g}s"
    return refusal(408, message, "header_timeout")


class Deadline:
    """A connection's one pending deadline (its head's, its body's, keep-alive), replaced or
    cancelled as the connection moves on; ``what`` names the pending one (None: none)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self.what: str | None = None

    def set(self, delay_s: float, callback: Callable[[], None], what: str) -> None:
        self.cancel()
        self._handle = self._loop.call_later(delay_s, self._fire, callback)
        self.what = what

    def _fire(self, callback: Callable[[], None]) -> None:
        self._handle = self.what = None
        callback()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = self.what = None


def close(transport: asyncio.Transport, last: bytes, linger: bool) -> None:
    """Send ``last`` and close; with ``linger``, read and drop what the client still sends for
    LINGER_S first (see constants.LINGER_S)."""
    transport.write(last)
    if linger and transport.can_write_eof():
        transport.write_eof()
        asyncio.get_running_loop().call_later(constants.LINGER_S, transport.close)
    else:
        transport.close()


class LimitedConfig(uvicorn.Config):
    """uvicorn's configuration, with the limits and the server's connection slots (pickled to
    each process of ``--processes N``: every process has its own)."""

    def __init__(self, app: Any, *, limits: HttpLimits, **kwargs: Any) -> None:
        kwargs["http"] = LimitedHttpToolsProtocol
        super().__init__(app, **kwargs)
        self.limits = limits
        self.slots = ConnectionSlots(connection_cap(limits))


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of its LimitedConfig (see module doc)."""

    def __init__(self, config: LimitedConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits = config.limits
        self.slots = config.slots
        self.deadline = Deadline(self.loop)
        self._stall: asyncio.TimerHandle | None = None
        self._in_head = True  # reading a request's line and headers (or waiting for one)
        self._head_bytes = 0
        self._body_since = 0.0
        self._body_bytes = 0
        self._refused = False

    # -- timers ----------------------------------------------------------------------

    def _head_too_slow(self) -> None:
        self._refused = True
        close(self.transport, head_timeout(self.limits), linger=False)

    def _body_check(self) -> None:
        limits = self.limits
        allowed = (
            self._body_since
            + limits.body_timeout_s
            + self._body_bytes / limits.body_min_bytes_per_s
        )
        if self.flow.read_paused or self.loop.time() < allowed:  # paused: the app's doing
            self.deadline.set(max(allowed - self.loop.time(), 1.0), self._body_check, "body")
        else:
            logger.info("cut a client sending its body too slowly (%d bytes)", self._body_bytes)
            self.transport.close()

    def _write_stalled(self) -> None:
        logger.info("cut a client that read nothing for %.0fs", self.limits.write_stall_timeout_s)
        self.transport.abort()

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer ``status`` and close, dropping what still arrives for a moment."""
        self._refused = True
        self.deadline.cancel()
        close(self.transport, refusal(status, message, code), linger=True)

    def evict(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    # -- connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.deadline.set(self.limits.header_timeout_s, self._head_too_slow, "head")
        self.slots.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline.cancel()
        if self._stall is not None:
            self._stall.cancel()
        self.slots.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # Counted per read while a head is incomplete: httptools buffers a header whole,
            # however long, before it calls back (approximate only for pipelined requests).
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                limit = self.limits.max_header_bytes
                self._refuse(431, f"request headers larger than {limit} bytes", "headers_too_large")

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stall = self.loop.call_later(self.limits.write_stall_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    # -- parser callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.deadline.what is None:  # a kept-alive connection's next request
            self.deadline.set(self.limits.header_timeout_s, self._head_too_slow, "head")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self.slots.busy(self)
        self._body_since = self.loop.time()
        self._body_bytes = 0
        self.deadline.set(self.limits.body_timeout_s, self._body_check, "body")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.deadline.cancel()
        self._in_head = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.slots.rest(self)


class EmbeddedServer(uvicorn.Server):
    """A server inside a process that owns its signals (the worker agent drains on SIGTERM):
    uvicorn's own handlers are not installed."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_config(
    app: Any,
    *,
    host: str = constants.DEFAULT_HOST,
    port: int = 0,
    uds: str | None = None,
    limits: HttpLimits | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    graceful_s: float = constants.STOP_GRACE_S,
    **options: Any,
) -> LimitedConfig:
    """uvicorn's configuration for a fleetserve server (uvloop, httptools with limits).

    ``tls_cert_file`` and ``tls_key_file``: serve HTTPS. ``uds``: a Unix socket instead
    of ``host``/``port``.
    """
    return LimitedConfig(
        app,
        host=host,
        port=port,
        uds=uds,
        limits=limits or HttpLimits(),
        ws="none",  # no fleetserve server speaks WebSocket: no upgrade past the limits
        log_level="warning",
        log_config=None,  # the process's logging as its CLI set it up
        access_log=False,
        proxy_headers=False,  # fleetserve reads no X-Forwarded-*: skip that middleware
        server_header=False,
        ssl_certfile=tls_cert_file,
        ssl_keyfile=tls_key_file,
        timeout_graceful_shutdown=int(graceful_s),
        **options,
    )


def serve(app: Any, **options: Any) -> None:
    """Run an ASGI app until SIGTERM/SIGINT (options: :func:`make_config`'s, and uvicorn's
    ``workers`` with ``factory=True`` and an import string for several processes)."""
    config = make_config(app, **options)
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
            return
        server.run()
    finally:
        if config.uds and os.path.exists(config.uds):
            os.remove(config.uds)
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE; it logged why
