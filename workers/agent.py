"""The worker agent: start the engine, wait for it, register, heartbeat, drain.

Lifecycle of one replica:

1. start the engine (a child process under fleetserve.reaper) on a free port;
2. wait for its /health, printing progress while the model loads;
3. register with the controller, then heartbeat the load read from the
   engine's /metrics; re-register when the controller says it forgot us;
4. if the engine dies: deregister at once, restart it with backoff;
5. on SIGTERM/SIGINT: drain (out of the routing table), let in-flight
   requests finish, deregister, stop the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import time
import uuid

import httpx

from fleetserve import constants, procs
from fleetserve.config import WorkerSettings, slug
from fleetserve.protocol import (
    Heartbeat,
    HeartbeatReply,
    Registration,
    RegistrationReply,
    WorkerLoad,
    WorkerState,
)
from workers.engines import Engine
from workers.load import parse_load
from workers.status_server import StatusServer

logger = logging.getLogger(__name__)

_TICK_S = 0.2
_PROGRESS_EVERY_S = 5.0


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Agent:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.engine = Engine.registry[settings.engine](settings)
        self.worker_id = f"{slug(settings.served_name)}-{uuid.uuid4().hex[:8]}"
        self.heartbeat_interval_s = constants.HEARTBEAT_INTERVAL_S
        self._stop = asyncio.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._engine_url = ""
        self._base_url = ""
        self._controller = settings.controller_url.rstrip("/")
        self.registered = False
        self.engine_restarts = 0

    # -- the main loop -------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        status = await StatusServer.start(self)  # readiness probe and /metrics, if asked for
        await asyncio.to_thread(self.engine.prepare)
        backoff_s = 1.0
        async with httpx.AsyncClient(timeout=5.0) as http:
            self._http = http
            while not self._stop.is_set():
                started = time.monotonic()
                self._start_engine()
                if await self._wait_ready():
                    await self._serve()
                if self._stop.is_set():
                    break
                if time.monotonic() - started > 60:
                    backoff_s = 1.0
                code = self._proc.poll() if self._proc else None
                logger.error("engine exited (code %s); restarting in %.0fs", code, backoff_s)
                self.engine_restarts += 1
                await self._sleep(backoff_s)
                backoff_s = min(backoff_s * 2, constants.ENGINE_RESTART_BACKOFF_MAX_S)
            await self._shutdown()
        await status.stop()
        return 0

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            logger.warning("second %s: killing the engine now", sig.name)
            if self._proc:
                self._proc.send_signal(signal.SIGINT)  # the reaper's "kill the group now"
            return
        logger.info("%s received: draining worker %s", sig.name, self.worker_id)
        self._stop.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up early when asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _engine_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def ready(self) -> bool:
        """Serving: engine up, registered, not draining (the readiness probe's answer)."""
        return self.registered and self._engine_alive() and not self._stop.is_set()

    # -- engine --------------------------------------------------------------

    def _start_engine(self) -> None:
        s = self.settings
        port = s.port or free_port(s.host)
        advertise = s.advertise_host or (socket.gethostname() if s.host == "0.0.0.0" else s.host)
        self._engine_url = f"http://{s.host if s.host != '0.0.0.0' else '127.0.0.1'}:{port}"
        self._base_url = f"http://{advertise}:{port}/v1"
        cmd = self.engine.command(port)
        logger.info("starting %s engine: %s", self.engine.name, " ".join(cmd))
        self._proc = procs.spawn_tree(cmd, env=self.engine.environment())

    async def _wait_ready(self) -> bool:
        started = last_progress = time.monotonic()
        while time.monotonic() - started < constants.ENGINE_READY_TIMEOUT_S:
            if self._stop.is_set() or not self._engine_alive():
                return False
            try:
                if (await self._http.get(f"{self._engine_url}/health")).status_code == 200:
                    logger.info(
                        "engine ready after %.1fs at %s", time.monotonic() - started, self._base_url
                    )
                    return True
            except httpx.HTTPError:
                pass
            if time.monotonic() - last_progress >= _PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                logger.info(
                    "loading %s with %s ... %.0fs",
                    self.settings.model or self.settings.served_name,
                    self.engine.name,
                    last_progress - started,
                )
            await asyncio.sleep(0.5)
        logger.error(
            "engine not ready after %.0fs; restarting it", constants.ENGINE_READY_TIMEOUT_S
        )
        if self._proc is not None:
            await asyncio.to_thread(procs.stop, self._proc, constants.REAPER_STOP_GRACE_S)
        return False

    async def _read_load(self) -> WorkerLoad | None:
        try:
            response = await self._http.get(f"{self._engine_url}/metrics")
            response.raise_for_status()
            return parse_load(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("cannot read engine load: %s", exc)
            return None

    # -- controller ----------------------------------------------------------

    def _registration(self, load: WorkerLoad, state: WorkerState) -> Registration:
        s = self.settings
        return Registration(
            worker_id=self.worker_id,
            model_names=s.model_names,
            base_url=self._base_url,
            engine=self.engine.name,
            tensor_parallel_size=s.tensor_parallel_size,
            capacity=self.engine.capacity(),
            routing_policy=s.routing_policy,
            state=state,
            load=load,
        )

    async def _register(self, load: WorkerLoad, state: WorkerState = WorkerState.READY) -> bool:
        body = self._registration(load, state).model_dump(mode="json")
        try:
            response = await self._http.post(f"{self._controller}/workers/register", json=body)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            logger.warning("cannot register with the controller at %s: %s", self._controller, exc)
            return False
        reply = RegistrationReply.model_validate(response.json())
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        self.registered = True
        logger.info(
            "registered as %s serving %s", self.worker_id, ", ".join(self.settings.model_names)
        )
        return True

    async def _heartbeat(self, load: WorkerLoad) -> bool:
        """Send one heartbeat; False when the controller does not know us."""
        body = Heartbeat(worker_id=self.worker_id, load=load).model_dump(mode="json")
        try:
            response = await self._http.post(f"{self._controller}/workers/heartbeat", json=body)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            logger.warning("heartbeat failed: %s", exc)
            return True  # not "unknown": the controller is away; keep serving
        return HeartbeatReply.model_validate(response.json()).known

    async def _deregister(self) -> None:
        self.registered = False
        try:
            await self._http.delete(f"{self._controller}/workers/{self.worker_id}")
        except httpx.HTTPError as exc:
            logger.warning("cannot deregister (the controller will expire us): %s", exc)

    async def _serve(self) -> None:
        """Registered life of a ready engine; returns when it died or a stop was asked."""
        registered = False
        next_beat = 0.0
        while not self._stop.is_set():
            if not self._engine_alive():
                if registered:
                    await self._deregister()
                return
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_interval_s
                load = await self._read_load() or WorkerLoad()
                if not registered or not await self._heartbeat(load):
                    if registered:
                        logger.info("the controller forgot us (restarted?): registering again")
                    registered = await self._register(load)
                    if not registered:
                        next_beat = time.monotonic() + 1.0
            await self._sleep(_TICK_S)
        if registered:
            await self._drain()

    async def _drain(self) -> None:
        """Out of the routing table first, then wait for in-flight requests."""
        try:
            await self._http.post(f"{self._controller}/workers/{self.worker_id}/drain")
        except httpx.HTTPError as exc:
            logger.warning("cannot tell the controller we drain: %s", exc)
        started = time.monotonic()
        await asyncio.sleep(constants.DRAIN_MIN_S)
        while time.monotonic() - started < constants.DRAIN_TIMEOUT_S and self._engine_alive():
            load = await self._read_load()
            if load is not None and load.running + load.waiting == 0:
                break
            await asyncio.sleep(_TICK_S)
        logger.info("drained in %.1fs", time.monotonic() - started)
        await self._deregister()

    async def _shutdown(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            logger.info("stopping the engine")
            await asyncio.to_thread(procs.stop, self._proc, constants.REAPER_STOP_GRACE_S)
        logger.info("worker %s stopped", self.worker_id)


def run_worker(settings: WorkerSettings) -> int:
    return asyncio.run(Agent(settings).run())
