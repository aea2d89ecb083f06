"""A lean HTTP/1.1 client for the hot path: pooled keep-alive connections to engines.

The gateway sends one kind of request (a POST with a JSON body) to one kind of
server (an engine's OpenAI endpoint) and relays the answer's bytes. A general
client (aiohttp) spent about a third of the gateway's CPU building and writing
each request (see README, Performance); this one writes a request in a single
``transport.write`` and parses answers with httptools, the parser uvicorn
uses. Everything else (the controller watch) keeps using aiohttp. Engines are
reached over plain HTTP, or TLS for an attached server behind https (a hosted
provider), verified against the system's CA certificates (or $SSL_CERT_FILE's).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import typing
from collections.abc import AsyncIterator

import httptools

logger = logging.getLogger(__name__)

# Stop reading from an engine while this much of its answer waits for a slow client.
_HIGH_WATER_BYTES = 1 << 20
#: The header lines of a JSON request (what the proxied OpenAI routes send).
JSON_HEADERS = b"Content-Type: application/json\r\n"
#: An engine's address: host, port, and whether it speaks TLS.
_Key = tuple[str, int, bool]


class UpstreamError(ConnectionError):
    """The engine failed: refused or lost connection, invalid HTTP, or (from the proxy) a 5xx.

    ``refused``: no connection could be made at all (nothing listens there): the
    worker's circuit opens at once (gateway/breaker.py); other failures count.
    """

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class UpstreamResponse:
    """The answer on one connection: status and content type, then body chunks."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = 0
        self.content_type = ""
        self.headers_done: asyncio.Future[None] = connection.loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.error: Exception | None = None
        self.received_any = False

    # -- fed by the connection ------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER_BYTES:
            self._connection.pause_reading()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: Exception) -> None:
        self.error = error
        if not self.headers_done.done():
            self.headers_done.set_exception(error)
        self._wake()

    # -- read by the proxy -----------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing received is waiting to be read, and more is expected."""
        return not self._chunks and not self.complete and self.error is None

    async def next_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end. UpstreamError if the connection broke."""
        while not self._chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise UpstreamError(str(self.error))
            self._waiter = self._connection.loop.create_future()
            await self._waiter
            self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= _HIGH_WATER_BYTES:
            self._connection.resume_reading()
        return chunk

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.next_chunk():
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def release(self) -> None:
        """Done with it: the connection goes back to the pool if the answer was complete."""
        self._connection.release(self)

    def close(self) -> None:
        """Abandon the answer and the connection (the engine sees the disconnect)."""
        self._connection.abort()


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: _Key) -> None:
        self.loop = asyncio.get_running_loop()
        self._pool = pool
        self._key = key
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._response: UpstreamResponse | None = None
        self._paused = False
        self.closed = False

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they behave as one.
        self._transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"invalid HTTP from upstream: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self._key, self)
        self._fail(UpstreamError(f"connection closed: {exc}" if exc else "connection closed"))

    # -- httptools callbacks -----------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None and name.lower() == b"content-type":
            self._response.content_type = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response = self._response
        if response is not None:
            response.status = self._parser.get_status_code()
            response.received_any = True
            if not response.headers_done.done():
                response.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response.feed(bytes(body))

    def on_message_complete(self) -> None:
        if self._response is not None:
            self._response.finish()
        if not self._parser.should_keep_alive():
            self.closed = True

    # -- used by the pool and the response ---------------------------------------

    def send(self, head: bytes, body: bytes) -> UpstreamResponse:
        assert self._transport is not None
        self._response = UpstreamResponse(self)
        self._transport.write(head + body)
        return self._response

    def _fail(self, error: Exception) -> None:
        if self._response is not None and not self._response.complete:
            self._response.fail(error)

    def pause_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self._transport is not None and not self.closed:
            self._paused = False
            self._transport.resume_reading()

    def release(self, response: UpstreamResponse) -> None:
        if response is not self._response:
            return
        self._response = None
        if response.complete and not self.closed:
            self._pool.put_back(self._key, self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


async def _headers(response: UpstreamResponse) -> UpstreamResponse:
    """``response`` once its head arrived. Cancelled before (a timeout, a client that left):
    its connection is closed, so that the engine sees the disconnect and stops generating."""
    try:
        await response.headers_done
    except asyncio.CancelledError:
        response.close()
        raise
    return response


class UpstreamPool:
    """Keep-alive connections per engine (host, port); one request at a time on each."""

    def __init__(self, connect_timeout_s: float = 5.0) -> None:
        self._idle: dict[_Key, list[_Connection]] = collections.defaultdict(list)
        self._connect_timeout_s = connect_timeout_s
        self._tls: ssl.SSLContext | None = None  # made when a first engine needs it

    def forget(self, key: _Key, connection: _Connection) -> None:
        idle = self._idle.get(key)
        if idle and connection in idle:
            idle.remove(connection)

    def put_back(self, key: _Key, connection: _Connection) -> None:
        self._idle[key].append(connection)

    async def _connect(self, key: _Key) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port, tls = key
        if tls and self._tls is None:
            self._tls = ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, key),
                    host,
                    port,
                    ssl=self._tls if tls else None,
                    server_hostname=host if tls else None,
                ),
                self._connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(
                f"cannot connect to {key[0]}:{key[1]}: {exc}", refused=True
            ) from None
        return connection

    async def post(
        self,
        host: str,
        port: int,
        path: str,
        body: bytes,
        *,
        method: str = "POST",
        headers: bytes = JSON_HEADERS,
        tls: bool = False,
    ) -> UpstreamResponse:
        """Send a request; returns once the answer's status line and headers arrived.

        ``headers``: header lines, each ending in CRLF, encoded once by the caller (the
        content type of ``body`` among them); Host and Content-Length are added here.
        ``tls``: the engine speaks HTTPS.
        """
        key = (host, port, tls)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
        ).encode("latin-1")
        head += headers + b"\r\n"
        idle = self._idle[key]
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            response = connection.send(head, body)
            try:
                return await _headers(response)
            except UpstreamError:
                # The engine closed this idle keep-alive connection before our request
                # reached it: not the engine's fault, try another connection.
                if response.received_any:
                    raise
        return await _headers((await self._connect(key)).send(head, body))

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.abort()
        self._idle.clear()
