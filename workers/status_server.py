"""The worker agent's own HTTP server: health for probes, metrics for Prometheus.

Kubernetes needs to know when a worker can take traffic: ``/health`` answers
200 only while the engine is up, registered with the controller and not
draining, and 503 otherwise (loading, restarting, draining), so a rolling
update waits for the new replica's engine before it stops an old one.
``/live`` answers while the agent's loop runs (loading a big model is not a
reason to be killed). ``/metrics`` carries the agent's ``fleetserve_worker_*``
metrics followed by the engine's own metrics, fetched at scrape time: one
scrape target per worker gives both.

It runs in the agent's event loop (aiohttp: no signal handlers of its own,
unlike uvicorn's server, so the agent keeps its SIGTERM drain).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from fleetserve import constants

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


class StatusServer:
    """Started by the agent when ``settings.status_port`` is set; a no-op otherwise."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._metrics = CollectorRegistry()
        self._metrics.register(AgentCollector(agent))
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    async def start(cls, agent: Agent) -> StatusServer:
        server = cls(agent)
        port = agent.settings.status_port
        if port is not None:
            app = web.Application()
            app.router.add_get("/health", server._health)
            app.router.add_get("/live", server._live)
            app.router.add_get("/metrics", server._prometheus)
            server._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=constants.ENGINE_METRICS_TIMEOUT_S)
            )
            server._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await server._runner.setup()
            await web.TCPSite(server._runner, agent.settings.host, port).start()
            logger.info(
                "agent status on http://%s:%d (/health, /live, /metrics)",
                agent.settings.host,
                port,
            )
        return server

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _health(self, _: web.Request) -> web.Response:
        agent = self._agent
        body = {"status": "ready" if agent.ready else "not ready", "worker_id": agent.worker_id}
        return web.json_response(body, status=200 if agent.ready else 503)

    async def _live(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "worker_id": self._agent.worker_id})

    async def _prometheus(self, _: web.Request) -> web.Response:
        text = generate_latest(self._metrics)
        engine_url = self._agent._engine_url  # where the agent itself reads the engine's load
        if engine_url and self._session is not None and self._agent._engine_alive():
            try:
                async with self._session.get(f"{engine_url}/metrics") as response:
                    if response.status == 200:
                        text += b"\n" + await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.debug("engine metrics unavailable: %s", exc)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
