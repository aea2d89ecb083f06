"""The worker agent's own HTTP server: health for probes, metrics for Prometheus.

Kubernetes needs to know when a worker can take traffic: ``/health`` answers
200 only while the engine is up, registered with the controller and not
draining, and 503 otherwise (loading, restarting, draining), so a rolling
update waits for the new replica's engine before it stops an old one.
``/live`` answers while the agent's loop runs (loading a big model is not a
reason to be killed). ``/metrics`` carries the agent's ``fleetserve_worker_*``
metrics followed by the engine's own metrics, fetched at scrape time: one
scrape target per worker gives both. All three are open, as the controller's
``/health`` and ``/metrics`` are (controller/api.py says why); the engine's
own routes are reached only through the relay, with the worker's secret.

It runs in the agent's event loop, with the limits of every fleetserve server
(fleetserve/http.py), and without uvicorn's signal handlers: the agent keeps
its SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleetserve import constants
from fleetserve.http import EmbeddedServer, make_config

if TYPE_CHECKING:
    from workers.agent import Agent

logger = logging.getLogger(__name__)


class AgentCollector(Collector):
    """The agent's state as metrics, read at scrape time."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        names = ["model", "worker"]
        labels = [agent.settings.served_name, agent.worker_id]
        info = GaugeMetricFamily(
            "fleetserve_worker_info",
            "Always 1; the worker's engine and tensor-parallel size as labels.",
            labels=[*names, "engine", "tensor_parallel_size"],
        )
        info.add_metric([*labels, agent.engine.name, str(agent.settings.tensor_parallel_size)], 1)
        yield info
        ready = GaugeMetricFamily(
            "fleetserve_worker_ready",
            "1 while the engine is up, registered and not draining (what /health says).",
            labels=names,
        )
        ready.add_metric(labels, 1 if agent.ready else 0)
        yield ready
        restarts = CounterMetricFamily(
            "fleetserve_worker_engine_restarts",
            "Times the engine died (or never got ready) and was started again.",
            labels=names,
        )
        restarts.add_metric(labels, agent.engine_restarts)
        yield restarts
        sleeper = agent.sleeper
        if sleeper is None:
            return
        asleep = GaugeMetricFamily(
            "fleetserve_worker_asleep",
            "1 while the engine sleeps (sleep_after_s: vLLM's sleep mode), out of the table.",
            labels=names,
        )
        asleep.add_metric(labels, 1 if sleeper.asleep else 0)
        yield asleep
        for name, text, value in [
            ("fleetserve_worker_sleeps", "Times the idle engine went to sleep.", sleeper.sleeps),
            ("fleetserve_worker_wakes", "Times a held request woke the engine.", sleeper.wakes),
            (
                "fleetserve_worker_wake_seconds",
                "Seconds the engine took to wake, summed (over wakes: the mean).",
                sleeper.wake_seconds,
            ),
        ]:
            counter = CounterMetricFamily(name, text, labels=names)
            counter.add_metric(labels, value)
            yield counter


class StatusServer:
    """Started by the agent when ``settings.status_port`` is set; a no-op otherwise."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._metrics = CollectorRegistry()
        self._metrics.register(AgentCollector(agent))
        self._server: EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, agent: Agent) -> StatusServer:
        server = cls(agent)
        settings = agent.settings
        if settings.status_port is not None:
            app = Starlette(
                routes=[
                    Route("/health", server._health),
                    Route("/live", server._live),
                    Route("/metrics", server._prometheus),
                ]
            )
            config = make_config(
                app, host=settings.host, port=settings.status_port, limits=agent.limits,
                lifespan="off", graceful_s=1,
            )  # fmt: skip
            server._server = uvicorn = EmbeddedServer(config)
            server._task = task = asyncio.create_task(uvicorn.serve())
            while not uvicorn.started and not task.done():
                await asyncio.sleep(0.01)
            if task.done():
                task.result()  # raises what stopped it (a port in use: uvicorn exits)
            logger.info(
                "agent status on http://%s:%d (/health, /live, /metrics)",
                settings.host,
                settings.status_port,
            )
        return server

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task

    async def _health(self, _: Request) -> Response:
        agent = self._agent
        body = {"status": "ready" if agent.ready else "not ready", "worker_id": agent.worker_id}
        return JSONResponse(body, status_code=200 if agent.ready else 503)

    async def _live(self, _: Request) -> Response:
        return JSONResponse({"status": "alive", "worker_id": self._agent.worker_id})

    async def _prometheus(self, _: Request) -> Response:
        text = generate_latest(self._metrics)
        engine = await self._agent.engine_metrics(constants.ENGINE_METRICS_TIMEOUT_S)
        if engine is not None:
            text += b"\n" + engine
        return Response(text, headers={"Content-Type": CONTENT_TYPE_LATEST})
