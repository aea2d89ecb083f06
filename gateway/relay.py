"""Relaying a stream to its client, resuming it on another worker when its worker fails.

While nothing fails, a chunk costs what it cost before resume existed, plus (for a
resumable stream) an append to the stream's log, a search for an error event and,
unless the client asked for token ids, taking them out again (README, Performance).
When the worker fails after the first byte (the connection breaks, the stream ends
without ``[DONE]``, the engine's error event for an engine failure, nothing for
``stream_idle_timeout_s``), the proxy resumes the stream on another worker
(gateway/resume.py) and the client's stream goes on as one stream; where it cannot,
the stream ends with an error event, as before.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fleetserve.errors import error_body
from gateway.metrics import RequestRecord
from gateway.resume import Continuation, EngineFailed, ResumePlan, StreamLog, strip_prompt_ids
from gateway.routing import RoutingContext
from gateway.table import ModelRoute
from gateway.upstream import UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    from gateway.proxy import Proxy

logger = logging.getLogger(__name__)

WORKER_HEADER = "x-fleetserve-worker"
_ERROR_EVENT = b'data: {"error"'
_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Resumption:
    """A broken stream's new worker, its answer, and how to write it for the client."""

    worker_id: str
    upstream: UpstreamResponse
    first_chunk: bytes
    continuation: Continuation


@dataclass(slots=True)
class Resumable:
    """What resuming one stream takes: its request's plan and what the client got so far."""

    plan: ResumePlan
    log: StreamLog
    route: ModelRoute
    ctx: RoutingContext
    #: The gateway asked for token ids the client did not: they are taken out again.
    strip: bool
    resumes: int = 0


def _engine_error(chunk: bytes) -> tuple[bytes, str | None]:
    """``chunk`` up to an engine-failure error event in it, and that error's message."""
    start = chunk.find(_ERROR_EVENT)
    if start < 0:
        return chunk, None
    end = chunk.find(b"\n\n", start)
    try:
        error = orjson.loads(chunk[start + len(b"data: ") : end if end >= 0 else None])["error"]
        code = error.get("code")
        message = str(error.get("message") or error)
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        return chunk, None
    if isinstance(code, int) and code < 500:
        return chunk, None  # the request's own fault (vLLM: 400): the client's to see
    return chunk[:start], message


class UpstreamStream(Response):
    """Streams an upstream response to the client; closing either side closes the other."""

    def __init__(
        self,
        proxy: Proxy,
        upstream: UpstreamResponse,
        first_chunk: bytes,
        worker_id: str,
        record: RequestRecord,
        resumable: Resumable | None,
        idle_timeout_s: float,
    ) -> None:
        self.status_code = upstream.status
        self.background = None
        self._proxy = proxy
        self._upstream = upstream
        self._first_chunk = first_chunk
        self.worker_id = worker_id
        self.record = record
        self.resumable = resumable
        self._idle_timeout_s = idle_timeout_s
        self._continuation: Continuation | None = None
        self._chunks = 0
        self._idle: str | None = None
        self._resuming: asyncio.Task[Resumption | bytes | None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._client_gone = False
        self.init_headers(
            {
                "content-type": upstream.content_type or "text/event-stream",
                "cache-control": "no-cache",
                WORKER_HEADER: worker_id,
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        listener = asyncio.create_task(self._watch_client(receive))
        self._check_idle(0, first=True)
        finished = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            chunk: bytes | None = self._first_chunk
            while chunk is not None:
                failure = await self._relay(chunk, send)
                if failure is None or self._client_gone:
                    break
                chunk = await self._recover(failure, send)
            meter = self.record.meter
            rest = meter.finish() if meter is not None and not self._client_gone else b""
            await send({"type": "http.response.body", "body": rest, "more_body": False})
            finished = not self._client_gone
        except OSError:
            pass  # the client went away while we were sending
        finally:
            listener.cancel()
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self._resuming is not None:
                self._resuming.cancel()
            if finished:
                self._upstream.release()  # keep the connection for the next request
            else:
                self._upstream.close()  # the engine sees the disconnect and aborts the generation
            self._proxy.release(self.worker_id)

    async def _relay(self, chunk: bytes, send: Send) -> str | None:
        """Pass the current upstream's answer on: None at its proper end, else why it broke."""
        upstream, meter, resumable = self._upstream, self.record.meter, self.resumable
        log = resumable.log if resumable is not None and self._continuation is None else None
        # The prompt's token ids the gateway asked for go (the first chunk carries them); the
        # tokens' own ids, a few bytes a chunk, stay: taking them out too cost 11% more gateway
        # CPU per 16-token stream (README, Performance).
        strip = log is not None and resumable is not None and resumable.strip
        continuation = self._continuation
        last = b""
        error = None
        try:
            while chunk:
                self._chunks += 1  # the idle watchdog's evidence
                if continuation is not None:
                    chunk = continuation.feed(chunk)
                if meter is not None:
                    chunk = meter.feed(chunk)  # whole events only; usage taken out if unasked
                if log is not None and chunk:
                    if _ERROR_EVENT in chunk:
                        chunk, error = _engine_error(chunk)
                    log.add(chunk)
                    last = chunk
                    if strip:
                        chunk, strip = strip_prompt_ids(chunk), False
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if error is not None:
                    return f"the engine failed: {error}"
                chunk = await upstream.next_chunk()
        except UpstreamError as exc:
            return self._idle or str(exc) or type(exc).__name__
        except EngineFailed as exc:
            return f"the engine failed: {exc}"
        if continuation is not None and not continuation.done:
            return "the stream ended before [DONE]"
        if log is not None and not last.endswith(_DONE):
            return "the stream ended before [DONE]"
        return None

    async def _recover(self, failure: str, send: Send) -> bytes | None:
        """After the worker failed mid-stream: the new worker's first chunk, or None once the
        stream was ended (its end, or an error event)."""
        failed = self.worker_id
        logger.warning("worker %s failed mid-stream: %s", failed, failure)
        self._proxy.stream_failed(self)
        self._upstream.close()
        meter = self.record.meter
        if meter is not None:
            meter.drop_partial()  # an unfinished event of the broken stream
        self._resuming = asyncio.create_task(self._proxy.resume(self, failed))
        try:
            result = await self._resuming
        except asyncio.CancelledError:
            if not self._client_gone:
                raise
            return None
        finally:
            self._resuming = None
        if isinstance(result, Resumption):
            logger.info("stream of worker %s resumed on worker %s", failed, result.worker_id)
            self._proxy.release(failed)
            self.worker_id = result.worker_id
            self._upstream = result.upstream
            self._continuation = result.continuation
            return result.first_chunk
        if result is None:
            error = error_body(502, f"the worker failed mid-stream: {failure}", "upstream_error")
            result = b"data: " + orjson.dumps(error) + b"\n\n"
        elif meter is not None:
            result = meter.feed(result)  # the end of a whole answer: its usage is counted
        await send({"type": "http.response.body", "body": result, "more_body": True})
        return None

    async def _watch_client(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        # 499: the client went away; the engine aborts the generation (a resume too)
        self._client_gone = True
        self._upstream.close()
        if self._resuming is not None:
            self._resuming.cancel()

    def _check_idle(self, chunks_before: int, first: bool = False) -> None:
        """Every ``idle_timeout_s``: no chunk since the last look, while the engine owed one,
        means it stopped: its connection is closed, which breaks (and resumes) the stream.
        (One timer per stream, not one per chunk: a chunk costs a counter increment.)"""
        idle = self._chunks == chunks_before and self._resuming is None and self._upstream.idle
        if idle and not first:
            self._idle = f"nothing for {self._idle_timeout_s:g}s"
            self._upstream.close()
        self._watchdog = asyncio.get_running_loop().call_later(
            self._idle_timeout_s, self._check_idle, self._chunks
        )
