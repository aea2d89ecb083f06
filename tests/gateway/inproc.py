"""A cluster in the test's own event loop: the gateway in-process, everything it talks to on
loopback sockets.

The gateway's ASGI callable is driven through ``httpx.ASGITransport`` (its lifespan
run by hand), with the real ``openai`` client on top. The controller and the fake
engines are served by uvicorn on loopback ports from the same loop, so the gateway
watches the controller's routing table and reaches the engines through its own
connection pool (gateway/upstream.py), as it does in production. Workers are
registered over the controller's HTTP API, as worker agents do. No process is
started: the cluster is up after the controller's warm-up, and a gateway or a
model's workers are added in milliseconds.

The event loop runs only while an async test or fixture does: between them (sync
tests of the same session) every server here is frozen. The loop's clock (the gateway's:
gateway/clock.py) stands still meanwhile and skips idle waits (tests/gateway/conftest.py),
but the controller's registry counts in real time: so the controller runs without its
lifespan, the loop that expires silent workers (which would otherwise expire them all
after a pause), and there are no heartbeats to send; expiry is the registry's, tested with
a hand-made clock in tests/controller/test_registry.py.

What needs a real process (signals, restarts, ``--processes``, the CLI) stays in
tests/test_cluster_fake.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp

from controller.api import build_app as build_controller_app
from controller.settings import ControllerSettings
from fleetserve.protocol import Registration, RouteTable
from gateway.server import Gateway
from gateway.server import build_app as build_gateway_app
from gateway.settings import GatewaySettings
from workers.fake.engine import FakeEngine
from workers.fake.server import FakeServer
from workers.fake.server import build_app as build_engine_app

#: Deadline of every wait: never reached when things work, generous for a busy 2-core machine.
WAIT_S = 10.0
#: The controller publishes its first table after ``expiry_after_s`` (its warm-up: see
#: fleetserve/constants.py), the cluster's start-up time. Nothing expires: no expiry loop.
CONTROLLER = ControllerSettings(heartbeat_interval_s=0.1, expiry_after_s=0.5)
#: The base URL the in-process gateway answers at (no socket: httpx.ASGITransport).
GATEWAY_URL = "http://gateway"


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    """Wait until ``condition()`` holds; AssertionError naming ``what`` after ``timeout_s``
    (real seconds: a guard against a hang, however the loop's clock moves)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s}s")
        await asyncio.sleep(0.005)


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening, so that no one
    else gets it while in use."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


class _Uvicorn(uvicorn.Server):
    # uvicorn.Server.serve() replaces SIGINT/SIGTERM handlers while it runs; several servers
    # in one test process would restore each other's, and Ctrl-C must still stop pytest.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class LoopbackServer:
    """An ASGI app served by uvicorn on a free loopback port, from the running event loop."""

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        """``options``: more of uvicorn's settings (ssl_certfile...)."""
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            lifespan="off",
            log_config=None,  # leave the test process's logging as it is
            log_level="warning",
            access_log=False,
            # a request the gateway gave up on (504) may still be generating: cut it short
            timeout_graceful_shutdown=1,
            **options,
        )
        self._server = _Uvicorn(config)
        self._scheme = "https" if "ssl_certfile" in options else "http"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Serve until stop(); the server's base URL."""
        self._task = task = asyncio.create_task(self._server.serve())
        await eventually(lambda: self._server.started or task.done(), "uvicorn start-up")
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("uvicorn stopped at start-up")
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"{self._scheme}://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await self._task


@dataclass
class GatewayUnderTest:
    """One in-process gateway and the clients that talk to it."""

    app: Gateway
    #: Raw HTTP, for what the openai client would not send (bad bodies, no key).
    http: httpx.AsyncClient
    #: The same, in httpx2 (the HTTP package of anthropic 2.x, which takes no httpx client).
    http2: httpx2.AsyncClient
    #: Where it also listens on loopback (``serve=True``): httpx.ASGITransport hands a
    #: response over only once the app finished it, so a test of a client that leaves half
    #: way through a stream talks to this socket.
    url: str | None = None

    def client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        # max_retries=0: a failure must show, not be hidden by the client's own retries.
        return openai.AsyncOpenAI(
            base_url=f"{GATEWAY_URL}/v1",
            api_key=api_key,
            # openai 3 is typed for httpx2's client and takes httpx's as well (its "legacy" one)
            http_client=self.http,  # type: ignore[arg-type]
            max_retries=0,
        )

    def anthropic(self, api_key: str = "unused") -> anthropic.AsyncAnthropic:
        """Anthropic's own client (it sends the key as x-api-key, and anthropic-version)."""
        return anthropic.AsyncAnthropic(
            base_url=GATEWAY_URL, api_key=api_key, http_client=self.http2, max_retries=0
        )

    async def routing_table_version(self) -> int | None:
        version: int | None = (await self.http.get("/health")).json()["routing_table_version"]
        return version

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of /metrics: (name, labels) -> value."""
        text = (await self.http.get("/metrics")).text
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics; 0 while it does not exist."""
        return (await self.metrics()).get((name, frozenset(labels.items())), 0.0)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: GatewaySettings, serve: bool = False
) -> AsyncIterator[GatewayUnderTest]:
    """``build_app(settings)`` with its lifespan open, behind an ``httpx.ASGITransport`` (and
    on a loopback port too with ``serve``)."""
    app = build_gateway_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.lifespan(app.admin),
        httpx.AsyncClient(transport=transport, base_url=GATEWAY_URL, timeout=WAIT_S) as http,
        httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=app), base_url=GATEWAY_URL, timeout=WAIT_S
        ) as http2,
    ):
        server = LoopbackServer(app) if serve else None
        url = await server.start() if server is not None else None
        try:
            yield GatewayUnderTest(app, http, http2, url)
        finally:
            if server is not None:
                await server.stop()


@dataclass
class Workers:
    """The workers of one model (see InProcessCluster.model)."""

    model: str
    #: The live workers' ids: ``{model}-0``, ``{model}-1``...
    ids: list[str]
    #: The dead workers' ids (their port refuses connections): ``{model}-dead-0``...
    dead: list[str]
    #: The fake engine of each live worker, by worker id.
    engines: dict[str, FakeServer]
    #: Each live worker's engine URL (its OpenAI base URL without ``/v1``).
    urls: dict[str, str]


@dataclass
class InProcessCluster:
    """The controller on loopback, workers registered with it, and gateways watching it."""

    controller_url: str
    #: For the controller's API (over loopback, as workers and the CLI call it).
    http: httpx.AsyncClient
    #: The gateways to wait for after a change (see settle).
    gateways: list[GatewayUnderTest] = field(default_factory=list)

    async def register(self, registration: Registration) -> None:
        body = registration.model_dump(mode="json")
        (await self.http.post("/workers/register", json=body)).raise_for_status()

    async def deregister(self, worker_id: str) -> None:
        (await self.http.delete(f"/workers/{worker_id}")).raise_for_status()

    async def table(self) -> RouteTable:
        return RouteTable.model_validate_json((await self.http.get("/workers")).content)

    async def worker_ids(self, model: str, state: str = "ready") -> set[str]:
        return {
            w.worker_id
            for w in (await self.table()).workers
            if model in w.model_names and w.state.value == state
        }

    async def settle(self) -> None:
        """Wait until every gateway routes by the controller's current table."""
        version = (await self.table()).version
        for gateway in self.gateways:

            async def caught_up(gateway: GatewayUnderTest = gateway) -> bool:
                seen = await gateway.routing_table_version()
                return seen is not None and seen >= version

            await eventually(caught_up, f"routing table v{version} at the gateway")

    @contextlib.asynccontextmanager
    async def gateway(
        self, serve: bool = False, **settings: Any
    ) -> AsyncIterator[GatewayUnderTest]:
        """A gateway of this cluster with ``settings``, once it routes by the current table
        (``serve``: on a loopback port too)."""
        config = GatewaySettings(controller_url=self.controller_url, **settings)
        async with running_gateway(config, serve) as gateway:
            self.gateways.append(gateway)
            try:
                await self.settle()
                yield gateway
            finally:
                self.gateways.remove(gateway)

    @contextlib.asynccontextmanager
    async def model(
        self,
        name: str,
        replicas: int = 1,
        *,
        aliases: tuple[str, ...] = (),
        routing_policy: str | None = None,
        tokens_per_s: float = 0.0,
        dead: int = 0,
        vocabulary: str = "count",
        resumable: bool = True,
        fallbacks: tuple[str, ...] = (),
        **registration: Any,
    ) -> AsyncIterator[Workers]:
        """``replicas`` workers of ``name``, each with a fake engine of its own (``vocabulary``:
        see workers/fake/tokens.py), and ``dead`` workers whose port refuses connections,
        registered with ``routing_policy`` (``resumable``: as vLLM workers are; False as
        llama.cpp's) and ``fallbacks`` (and more ``registration`` fields); once every gateway
        routes them. Deregistered (and gone from every gateway) on exit."""
        names = [name, *aliases]
        servers: list[LoopbackServer] = []
        engines: dict[str, FakeServer] = {}
        urls: dict[str, str] = {}
        registered: list[str] = []
        with contextlib.ExitStack() as refusing:
            try:
                for i in range(replicas):
                    engine = FakeServer(names, tokens_per_s, 0.0, vocabulary)
                    server = LoopbackServer(build_engine_app(engine))
                    servers.append(server)
                    worker_id = f"{name}-{i}"
                    engines[worker_id] = engine
                    urls[worker_id] = await server.start()
                for i in range(dead):
                    port = refusing.enter_context(refusing_port())
                    urls[f"{name}-dead-{i}"] = f"http://127.0.0.1:{port}"
                for worker_id, url in urls.items():
                    await self.register(
                        Registration(
                            worker_id=worker_id,
                            model_names=names,
                            base_url=f"{url}/v1",
                            engine="fake",
                            capacity=8,
                            resumable=resumable,
                            routing_policy=routing_policy,
                            fallbacks=list(fallbacks),
                            **{"endpoints": list(FakeEngine.served_endpoints), **registration},
                        )
                    )
                    registered.append(worker_id)
                await self.settle()
                live = {w: url for w, url in urls.items() if w in engines}
                yield Workers(
                    name, list(engines), [w for w in urls if w not in engines], engines, live
                )
            finally:
                for worker_id in registered:
                    await self.deregister(worker_id)
                await self.settle()
                await asyncio.gather(*(server.stop() for server in servers))


@contextlib.asynccontextmanager
async def in_process_cluster() -> AsyncIterator[InProcessCluster]:
    """The controller under uvicorn on loopback, and its HTTP client."""
    controller = LoopbackServer(build_controller_app(CONTROLLER))  # no lifespan: see above
    url = await controller.start()
    try:
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as http:
            yield InProcessCluster(url, http)
    finally:
        await controller.stop()
