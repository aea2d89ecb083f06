"""The hot path: pick a worker, forward the request's bytes, stream the answer back.

The body is forwarded as received and the answer is passed through chunk by
chunk without re-encoding. A worker that fails before the first byte reaches
the client (refused connection, 5xx, connection lost) is cooled down and the
request goes to another worker of the same model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fleetserve import constants
from fleetserve.errors import OpenAIError, error_body
from gateway.metrics import GatewayMetrics, RequestRecord
from gateway.routing import RoutingContext
from gateway.table import ModelRoute, Target
from gateway.upstream import JSON_HEADERS, UpstreamError, UpstreamPool, UpstreamResponse
from gateway.usage import UsageMeter

logger = logging.getLogger(__name__)

WORKER_HEADER = "x-fleetserve-worker"


class UpstreamStream(Response):
    """Streams an upstream response to the client; closing either side closes the other."""

    def __init__(
        self,
        upstream: UpstreamResponse,
        first_chunk: bytes,
        worker_id: str,
        on_close: Callable[[], None],
        meter: UsageMeter | None,
        on_failure: Callable[[], None],
    ) -> None:
        self.status_code = upstream.status
        self._meter = meter
        self.background = None
        self._upstream = upstream
        self._first_chunk = first_chunk
        self._worker_id = worker_id
        self._on_close = on_close
        self._on_failure = on_failure
        self.init_headers(
            {
                "content-type": upstream.content_type or "text/event-stream",
                "cache-control": "no-cache",
                WORKER_HEADER: worker_id,
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upstream = self._upstream

        async def close_upstream_on_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            upstream.close()  # 499: the client went away; the engine aborts the generation

        listener = asyncio.create_task(close_upstream_on_disconnect())
        finished = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            meter = self._meter
            first = meter.feed(self._first_chunk) if meter else self._first_chunk
            await send({"type": "http.response.body", "body": first, "more_body": True})
            try:
                async for chunk in upstream.iter_chunks():
                    if meter is not None:
                        chunk = meter.feed(chunk)
                        if not chunk:
                            continue  # held back (part of an event) or taken out (usage)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except UpstreamError as exc:
                if listener.done():
                    return  # we closed it because the client left
                logger.warning("worker %s failed mid-stream: %s", self._worker_id, exc)
                self._on_failure()
                error = error_body(502, f"the worker failed mid-stream: {exc}", "upstream_error")
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + orjson.dumps(error) + b"\n\n",
                        "more_body": True,
                    }
                )
            rest = meter.finish() if meter else b""
            await send({"type": "http.response.body", "body": rest, "more_body": False})
            finished = True
        except OSError:
            pass  # the client went away while we were sending
        finally:
            listener.cancel()
            if finished:
                upstream.release()  # keep the connection for the next request
            else:
                upstream.close()  # the engine sees the disconnect and aborts the generation
            self._on_close()


class Proxy:
    """Sends requests to workers, retrying on another before the first byte; one per process."""

    def __init__(self, upstreams: UpstreamPool, metrics: GatewayMetrics) -> None:
        self._upstreams = upstreams
        self._metrics = metrics
        #: worker_id -> requests in flight from this gateway (what least-load routing counts)
        self.in_flight: dict[str, int] = defaultdict(int)
        #: worker_id -> monotonic time until which it is not picked (failed before first byte)
        self._cooldown_until: dict[str, float] = {}

    def _release(self, worker_id: str) -> None:
        self.in_flight[worker_id] -= 1
        self._metrics.in_flight -= 1

    def _cool_down(self, worker_id: str) -> None:
        if len(self._cooldown_until) > 10_000:  # workers come and go; never grow without bound
            now = time.monotonic()
            self._cooldown_until = {w: t for w, t in self._cooldown_until.items() if t > now}
        self._cooldown_until[worker_id] = time.monotonic() + constants.WORKER_COOLDOWN_S

    async def forward(
        self,
        route: ModelRoute,
        path: str,
        body: bytes,
        stream: bool,
        ctx: RoutingContext,
        record: RequestRecord,
        headers: bytes = JSON_HEADERS,
        method: str = "POST",
    ) -> Response:
        """Send ``body`` to a worker of ``route`` at ``path``; ``ctx``: what the policy sees.

        ``record`` gets the time spent waiting on engines and the usage meter's findings;
        ``headers``: the request's header lines (gateway/upstream.py).
        """
        now = time.monotonic()
        candidates = [t for t in route.workers if self._cooldown_until.get(t.worker_id, 0.0) <= now]
        tried: set[str] = set()
        last_error = ""
        for _ in range(constants.MAX_ATTEMPTS):
            pool = [target for target in candidates if target.worker_id not in tried]
            if not pool:
                break
            target = route.policy.pick(pool, ctx)
            if tried:
                self._metrics.retries.inc((record.model,))
            tried.add(target.worker_id)
            try:
                return await self._attempt(target, path, body, stream, record, headers, method)
            except UpstreamError as exc:  # before the first byte: another worker may take it
                last_error = str(exc) or type(exc).__name__
                logger.warning(
                    "worker %s failed before the first byte (%s); trying another",
                    target.worker_id,
                    last_error,
                )
                if exc.worker_down:
                    self._cool_down(target.worker_id)
                self._metrics.upstream_failures.inc((target.worker_id,))
        if not tried:
            raise OpenAIError(
                503,
                f"no healthy worker for model `{route.model}` right now; try again shortly",
                code="no_healthy_worker",
            )
        raise OpenAIError(
            502,
            f"every worker tried for `{route.model}` failed: {last_error}",
            code="upstream_error",
        )

    async def _attempt(
        self,
        target: Target,
        path: str,
        body: bytes,
        stream: bool,
        record: RequestRecord,
        request_headers: bytes,
        method: str,
    ) -> Response:
        worker_id = target.worker_id
        self.in_flight[worker_id] += 1
        self._metrics.in_flight += 1
        handed_off = False
        upstream: UpstreamResponse | None = None
        waiting_since = time.perf_counter()  # engine time: from here to its answer
        try:
            upstream = await self._upstreams.post(
                target.host,
                target.port,
                target.path_prefix + path,
                body,
                method=method,
                headers=request_headers,
                tls=target.tls,
            )
            if upstream.status >= 500:
                raise UpstreamError(f"HTTP {upstream.status}", worker_down=upstream.status != 500)
            meter = record.meter
            if stream and upstream.status == 200:
                first = await upstream.next_chunk()
                if not first:
                    raise UpstreamError("closed the stream before the first byte")
                record.answered = time.perf_counter()
                handed_off = True
                return UpstreamStream(
                    upstream,
                    first,
                    worker_id,
                    lambda: self._release(worker_id),
                    meter,
                    lambda: self._metrics.mid_stream_failures.inc((worker_id,)),
                )
            content = await upstream.read()
            record.answered = time.perf_counter()
            if meter is not None and upstream.status == 200:
                meter.read_body(content)
            headers = {WORKER_HEADER: worker_id}
            return Response(content, upstream.status, headers, upstream.content_type or None)
        finally:
            record.upstream_s += (record.answered or time.perf_counter()) - waiting_since
            if not handed_off:
                if upstream is not None:
                    upstream.release()
                self._release(worker_id)
