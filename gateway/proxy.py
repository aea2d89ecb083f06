"""The hot path: pick a worker, forward the request's bytes, stream the answer back.

The body is forwarded as received and the answer is passed through chunk by
chunk without re-encoding (gateway/relay.py). A worker that fails before the
first byte reaches the client (refused connection, 5xx, connection lost) counts
against its circuit (gateway/breaker.py) and the request goes to another worker
of the same model, within the retry budget and after a jittered backoff; so does
a non-streaming request whose worker fails before its answer is whole. A stream
whose worker fails after its first byte is resumed on another worker from its
token ids (gateway/resume.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson
from starlette.responses import Response

from fleetserve import constants
from fleetserve.errors import OpenAIError
from gateway import clock
from gateway.breaker import CircuitBreakers, RetryBudget, backoff_s
from gateway.metrics import GatewayMetrics, RequestRecord
from gateway.relay import WORKER_HEADER, Resumable, Resumption, UpstreamStream
from gateway.resume import Continuation, ResumePlan, StreamLog, clean_prefix, resume_body
from gateway.routing import RoutingContext
from gateway.settings import GatewaySettings
from gateway.table import ModelRoute, RoutingTable, Target
from gateway.upstream import JSON_HEADERS, UpstreamError, UpstreamPool, UpstreamResponse

logger = logging.getLogger(__name__)

__all__ = ["WORKER_HEADER", "Proxy"]

_CHAT = "/v1/chat/completions"
#: The routes whose streams resume (gateway/resume.py writes their chunks, no other's).
_RESUMABLE_PATHS = (_CHAT, "/v1/completions")


class _ResumeRefused(Exception):
    """The new worker refused the resume request itself (a 4xx): no other would take it."""


class Proxy:
    """Sends requests to workers, retrying, resuming; one per process."""

    def __init__(
        self,
        upstreams: UpstreamPool,
        metrics: GatewayMetrics,
        settings: GatewaySettings | None = None,
        routes: Callable[[], RoutingTable] | None = None,
    ) -> None:
        """``routes``: the current routing table (a resume picks among the workers ready now)."""
        settings = settings or GatewaySettings()
        self._upstreams = upstreams
        self._metrics = metrics
        self._routes = routes
        self._idle_timeout_s = settings.stream_idle_timeout_s
        self._max_resumes = settings.max_resumes
        #: worker_id -> requests in flight from this gateway (what least-load routing counts)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.breakers = CircuitBreakers(
            settings.circuit_failures, settings.circuit_open_s, clock.now
        )
        self.budget = RetryBudget(
            settings.retry_budget_ratio, settings.retry_budget_min_per_s, clock.now
        )
        metrics.circuits = self.breakers

    def _acquire(self, worker_id: str) -> None:
        self.in_flight[worker_id] += 1
        self._metrics.in_flight += 1

    def release(self, worker_id: str) -> None:
        """A request (or the part of a stream) on ``worker_id`` ended."""
        self.in_flight[worker_id] -= 1
        self._metrics.in_flight -= 1

    async def _post(
        self,
        target: Target,
        path: str,
        body: bytes,
        method: str = "POST",
        headers: bytes = JSON_HEADERS,
    ) -> UpstreamResponse:
        """One request to ``target``'s engine (every call to an engine goes through here);
        ``headers``: the request's own header lines, to which the engine's secret is added."""
        return await self._upstreams.post(
            target.host,
            target.port,
            target.path_prefix + path,
            body,
            method=method,
            # the usual JSON request's lines and secret are encoded once per table version
            headers=target.headers if headers is JSON_HEADERS else headers + target.auth,
            tls=target.tls,
        )

    async def _retry_allowed(self, model: str, retry: int) -> bool:
        """Within the retry budget? Then wait the ``retry``-th backoff. False if refused."""
        if not self.budget.allow(self._metrics.in_flight):
            self._metrics.retries_refused.inc((model,))
            return False
        await asyncio.sleep(backoff_s(retry))
        return True

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
        now = clock.now()
        self.budget.request(now)
        breakers = self.breakers
        candidates = [t for t in route.workers if breakers.available(t.worker_id, now)]
        resumes = stream and self._max_resumes and path in _RESUMABLE_PATHS
        plan = ResumePlan(ctx.payload, path == _CHAT, route.model) if resumes else None
        tried: set[str] = set()
        last_error = ""
        for _ in range(constants.MAX_ATTEMPTS):
            pool = [target for target in candidates if target.worker_id not in tried]
            if not pool:
                break
            if tried:
                if not await self._retry_allowed(record.model, len(tried)):
                    last_error += " (not retried: the retry budget is spent)"
                    break
                self._metrics.retries.inc((record.model,))
            target = route.policy.pick(pool, ctx)
            tried.add(target.worker_id)
            breakers.picked(target.worker_id)
            try:
                return await self._attempt(
                    target, route, path, body, stream, ctx, record, plan, headers, method
                )
            except UpstreamError as exc:  # before the first byte: another worker may take it
                last_error = str(exc) or type(exc).__name__
                logger.warning(
                    "worker %s failed before the first byte (%s); trying another",
                    target.worker_id,
                    last_error,
                )
                breakers.failed(target.worker_id, exc.refused)
                self._metrics.upstream_failures.inc((target.worker_id,))
            finally:
                breakers.done(target.worker_id)
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
        route: ModelRoute,
        path: str,
        body: bytes,
        stream: bool,
        ctx: RoutingContext,
        record: RequestRecord,
        plan: ResumePlan | None,
        request_headers: bytes,
        method: str,
    ) -> Response:
        worker_id = target.worker_id
        self._acquire(worker_id)
        handed_off = False
        upstream: UpstreamResponse | None = None
        resumable = None
        if plan is not None and plan.unsupported is None and target.resumable:
            body = plan.ask_token_ids(body)
            strip = not plan.client_token_ids
            resumable = Resumable(plan, StreamLog(), route, ctx, strip)
        waiting_since = time.perf_counter()  # engine time: from here to its answer
        try:
            upstream = await self._post(target, path, body, method, request_headers)
            if upstream.status >= 500:
                raise UpstreamError(f"HTTP {upstream.status}")
            meter = record.meter
            if stream and upstream.status == 200:
                first = await upstream.next_chunk()
                if not first:
                    raise UpstreamError("closed the stream before the first byte")
                record.answered = time.perf_counter()
                self.breakers.succeeded(worker_id)
                handed_off = True
                return UpstreamStream(
                    self, upstream, first, worker_id, record, resumable, self._idle_timeout_s
                )
            content = await upstream.read()
            record.answered = time.perf_counter()
            self.breakers.succeeded(worker_id)  # a 4xx too: the worker answered
            if meter is not None and upstream.status == 200:
                meter.read_body(content)
            headers = {WORKER_HEADER: worker_id}
            return Response(content, upstream.status, headers, upstream.content_type or None)
        finally:
            record.upstream_s += (record.answered or time.perf_counter()) - waiting_since
            if not handed_off:
                if upstream is not None:
                    upstream.release()
                self.release(worker_id)

    def status(self, routes: RoutingTable) -> dict[str, Any]:
        """This gateway's view of the workers (``GET /status``, ``fleetserve status``)."""
        now = clock.now()
        workers: dict[str, dict[str, Any]] = {}
        for route in routes.by_name.values():
            for target in route.workers:
                workers[target.worker_id] = {"worker_id": target.worker_id, "model": route.model}
        failing = self.breakers.states()
        for worker_id in failing.keys() - workers.keys():  # left the table, still remembered
            workers[worker_id] = {"worker_id": worker_id, "model": None}
        for worker_id, view in workers.items():
            view["circuit"] = self.breakers.state(worker_id, now).value
            view["failures"] = failing.get(worker_id, (None, 0))[1]
            view["in_flight"] = self.in_flight.get(worker_id, 0)
        return {
            "routing_table_version": routes.version,
            "in_flight": self._metrics.in_flight,
            "workers": sorted(workers.values(), key=lambda w: w["worker_id"]),
            "retries_refused": self.budget.refused,
        }

    # -- mid-stream ----------------------------------------------------------------------

    def stream_failed(self, stream: UpstreamStream) -> None:
        """``stream``'s worker failed after its first byte."""
        self.breakers.failed(stream.worker_id)
        self._metrics.mid_stream_failures.inc((stream.worker_id,))

    def _resume_outcome(self, model: str, outcome: str, why: str = "") -> None:
        self._metrics.resumes.inc((model, outcome))
        if outcome not in ("resumed", "ended"):
            logger.warning("a stream of %s was not resumed: %s %s", model, outcome, why)

    async def resume(self, stream: UpstreamStream, failed: str) -> Resumption | bytes | None:
        """Continue ``stream`` (whose worker ``failed``) on another worker: the new worker's
        answer, or the end of an answer that was whole (bytes), or None (error event)."""
        resumable, model, meter = stream.resumable, stream.record.model, stream.record.meter
        if resumable is None:  # not to be resumed (see _attempt)
            self._resume_outcome(model, "unsupported", "(the request, or its worker's engine)")
            return None
        plan, log = resumable.plan, resumable.log
        log.parse()
        ended = log.finish_reason is not None or (
            plan.max_tokens is not None and len(log.ids) >= plan.max_tokens
        )
        if ended and log.prompt is not None:
            self._resume_outcome(model, "ended")
            if meter is not None and (meter.prompt_tokens or meter.completion_tokens):
                return b"data: [DONE]\n\n"  # only [DONE] was lost (the usage was counted)
            return Continuation(plan, log, len(log.ids), sum(map(len, log.text))).ending()
        unsupported = plan.unsupported or log.unsupported
        if log.prompt is None:
            unsupported = "the engine sent no token ids"
        if unsupported is not None:
            self._resume_outcome(model, "unsupported", f"({unsupported})")
            return None
        if resumable.resumes >= self._max_resumes:
            self._resume_outcome(model, "exhausted")
            return None
        resumable.resumes += 1
        broke_at = time.perf_counter()
        tried = {failed}
        for retry in range(1, constants.MAX_ATTEMPTS + 1):
            if not await self._retry_allowed(model, retry):
                self._resume_outcome(model, "budget")
                return None
            target = self._resume_target(resumable, tried)
            if target is None:
                self._resume_outcome(model, "no_worker")
                return None
            tried.add(target.worker_id)
            self.breakers.picked(target.worker_id)
            try:
                async with asyncio.timeout(self._idle_timeout_s):
                    resumption, replayed = await self._resume_on(target, resumable)
            except (UpstreamError, TimeoutError) as exc:
                logger.warning("resuming on worker %s failed: %s", target.worker_id, exc)
                self.breakers.failed(target.worker_id, getattr(exc, "refused", False))
                continue
            except _ResumeRefused as exc:
                logger.warning("worker %s refused to resume a stream: %s", target.worker_id, exc)
                self._resume_outcome(model, "failed")
                return None
            finally:
                self.breakers.done(target.worker_id)
            self.breakers.succeeded(target.worker_id)
            self._resume_outcome(model, "resumed")
            self._metrics.replayed_tokens.inc((model,), replayed)
            self._metrics.resume_time.observe((model,), time.perf_counter() - broke_at)
            return resumption
        self._resume_outcome(model, "failed")
        return None

    def _resume_target(self, resumable: Resumable, tried: set[str]) -> Target | None:
        """A ready worker of the stream's model (as the routing table has it now) to resume on."""
        route = resumable.route
        if self._routes is not None:
            route = self._routes().by_name.get(resumable.plan.model) or route
        now = clock.now()
        pool = [
            t
            for t in route.workers
            if t.resumable
            and t.worker_id not in tried
            and self.breakers.available(t.worker_id, now)
        ]
        return route.policy.pick(pool, resumable.ctx) if pool else None

    async def _resume_on(self, target: Target, resumable: Resumable) -> tuple[Resumption, int]:
        """Ask ``target`` for the rest of the stream: its first chunk, and the tokens replayed."""
        plan, log = resumable.plan, resumable.log
        self._acquire(target.worker_id)
        try:

            async def detokenize(ids: list[int]) -> str:
                answer = await self._json(
                    target, "/detokenize", {"model": plan.model, "tokens": ids}
                )
                return str(answer["prompt"])

            k, chars = await clean_prefix(log.ids, "".join(log.text), detokenize)
            max_model_len = None
            if plan.max_tokens is None:  # the resume asks what vLLM gave the first request
                models = await self._json(target, "/v1/models", None)
                max_model_len = next(
                    (
                        m.get("max_model_len")
                        for m in models.get("data", [])
                        if m.get("max_model_len")
                    ),
                    None,
                )
            body = resume_body(plan, log, k, max_model_len)
            upstream = await self._post(target, "/v1/completions", body)
            try:
                if upstream.status != 200:
                    answer = (await upstream.read())[:300].decode(errors="replace")
                    error = f"HTTP {upstream.status}: {answer}"
                    raise UpstreamError(error) if upstream.status >= 500 else _ResumeRefused(error)
                first = await upstream.next_chunk()
                if not first:
                    raise UpstreamError("closed the stream before the first byte")
            except BaseException:
                upstream.close()
                raise
        except BaseException:
            self.release(target.worker_id)
            raise
        continuation = Continuation(plan, log, k, chars)
        return Resumption(target.worker_id, upstream, first, continuation), k

    async def _json(self, target: Target, path: str, payload: Any) -> Any:
        """A small JSON call to ``target``'s engine (GET when ``payload`` is None)."""
        method = "GET" if payload is None else "POST"
        body = b"" if payload is None else orjson.dumps(payload)
        upstream = await self._post(target, path, body, method)
        try:
            content = await upstream.read()
        finally:
            upstream.release()
        if upstream.status != 200:
            error = f"{path}: HTTP {upstream.status}: {content[:300].decode(errors='replace')}"
            raise UpstreamError(error) if upstream.status >= 500 else _ResumeRefused(error)
        return orjson.loads(content)
