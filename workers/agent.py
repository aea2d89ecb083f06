"""The worker agent: start the engine, wait for it, register, heartbeat, drain.

Lifecycle of one replica:

1. start the engine (a child process under fleetserve.reaper) on a Unix socket only this
   user reaches, behind the agent's relay on the worker's address (workers/relay.py), which
   lets through only requests carrying the worker's secret;
2. wait for its /health, printing progress while the model loads;
3. register with the controller (the cluster token on every call; the registration carries
   the secret, which the controller gives gateways only), then heartbeat the load read
   from the engine's /metrics; re-register when the controller says it forgot us;
4. if the engine dies: deregister at once, restart it with backoff;
5. on SIGTERM/SIGINT: drain (out of the routing table), let in-flight
   requests finish, deregister, stop the engine.

An attached server (engine openai, workers/attached/) is not started: the agent
asks it whether it answers on every heartbeat instead of watching a process,
deregisters it when it stops answering and registers it again when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from fleetserve import constants, env, procs
from fleetserve.adapters import LORA_ENGINE, MIXING_BUG_DEVICE
from fleetserve.auth import ClusterToken, client_tls, client_token, new_secret
from fleetserve.errors import ConfigError
from fleetserve.http import HttpLimits, raise_open_files_limit
from fleetserve.protocol import (
    Heartbeat,
    HeartbeatReply,
    Registration,
    RegistrationReply,
    WorkerLoad,
    WorkerState,
)
from workers import multinode
from workers.adapters import AdapterManager
from workers.engines import Engine
from workers.inventory import discover_machine, read_model_facts
from workers.kvevents import KvEventService
from workers.load import parse_load
from workers.placement import ModelFacts, ReplicaNeed, ReplicaPlan, plan_placement
from workers.relay import EngineRelay
from workers.settings import WorkerSettings, slug
from workers.sleep import Sleeper, Step, sleep, wake_up
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
        self.engine = Engine.named(settings.engine)(settings)
        self.worker_id = f"{slug(settings.served_name)}-{uuid.uuid4().hex[:8]}"
        self.heartbeat_interval_s = constants.HEARTBEAT_INTERVAL_S
        self._stop = asyncio.Event()
        self._proc: subprocess.Popen[bytes] | None = None  # the engine (rank > 0: the Ray node)
        self._ray: subprocess.Popen[bytes] | None = None  # rank 0 of a multi-node replica
        self.plan = ReplicaPlan(settings.served_name, 0, None)
        self.exit_code = 0
        self._base_url = ""
        self._controller = settings.controller_url.rstrip("/")
        self._token: ClusterToken | None = None
        self.registered = False
        self.engine_restarts = 0
        self.limits = HttpLimits.of(settings)
        #: What the relay and the KV event service ask of every request, and the engine's own
        #: key: this worker's only.
        self.engine_secret = env.engine_secret() or new_secret()
        self._port = 0  # where gateways reach the engine (the relay's port), fixed at start
        self._socket_dir: Path | None = None
        self._relay: EngineRelay | None = None
        self._engine_http: httpx.AsyncClient | None = None  # the agent's own way to the engine
        self.sleeper: Sleeper | None = None  # sleep_after_s: the engine's sleep mode
        self._engine_url = ""  # its root URL, as _engine_http reaches it
        #: An attached server's state, from its last health check.
        self._answering = False
        #: The routes the engine serves, learnt once it is ready.
        self._endpoints: list[str] = []
        #: Serves the engine's KV events to gateways (engines that publish them).
        self.kv_events: KvEventService | None = None
        self._kv_dir: Path | None = None
        #: The LoRA adapters registered with the engine (--max-adapters), once it is reachable.
        self.adapters: AdapterManager | None = None

    # -- the main loop -------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        raise_open_files_limit()
        status = await StatusServer.start(self)  # readiness probe and /metrics, if asked for
        try:
            self._token = client_token(self.settings.cluster_token_file)
            if self.settings.max_adapters and self.engine.name != LORA_ENGINE:
                raise ConfigError(
                    f"LoRA adapters (--max-adapters) are served by the {LORA_ENGINE} engine "
                    f"only, not {self.engine.name} (llama.cpp adapters are not supported)"
                )
            self.engine.check_installed()
            await asyncio.to_thread(self.engine.prepare)
            self.plan = await asyncio.to_thread(self._place)
        except ConfigError as exc:
            logger.error("%s", exc)
            await status.stop()
            return 2
        async with httpx.AsyncClient(timeout=5.0, verify=client_tls(self.settings.ca_file)) as http:
            self._http = http
            try:
                if self.settings.node_rank > 0:
                    await self._follow()
                elif (
                    len(self.settings.nodes) <= 1 or await self._start_ray_head()
                ) and await self._open_engine_path():
                    await self._serve_engine()
            finally:
                await self._shutdown()
        await status.stop()
        return self.exit_code

    async def _open_engine_path(self) -> bool:
        """The relay on the worker's address and the engine's socket behind it (or, for an
        engine without Unix sockets, its port on the worker's address); False if the address
        cannot be listened on."""
        s = self.settings
        secret = {"Authorization": f"Bearer {self.engine_secret}"}
        if self.engine.attached:  # someone else's server, behind its own key if any
            self._engine_url, self._base_url = self.engine.urls()
            self._engine_http = httpx.AsyncClient(
                base_url=self._engine_url, headers=self.engine.request_headers(), timeout=5.0
            )
            return True
        if not self.engine.unix_socket:
            self._port = s.port or free_port(s.host)
            url = f"http://{s.host if s.host != '0.0.0.0' else '127.0.0.1'}:{self._port}"
            self._engine_url = url
            self._engine_http = httpx.AsyncClient(base_url=url, headers=secret, timeout=5.0)
            return True
        # mkdtemp: a directory only this user may enter (0700), whatever the socket's own mode
        self._socket_dir = Path(tempfile.mkdtemp(prefix="fleetserve-engine-"))
        self.engine.socket = str(self._socket_dir / "engine.sock")
        self._relay = EngineRelay(self.engine_secret, self.engine.socket, self.limits)
        try:
            self._port = await self._relay.start(s.host, s.port)
        except OSError as exc:
            logger.error("cannot listen on %s:%d: %s", s.host, s.port, exc)
            self.exit_code = 2
            return False
        self._engine_url = "http://engine"
        self._engine_http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.engine.socket),
            base_url=self._engine_url,
            headers=secret,
            timeout=5.0,
        )
        if s.max_adapters:  # the engine's LoRA endpoints: through its socket, never the relay
            self.adapters = AdapterManager(
                self._engine_http,
                s.max_adapters,
                s.max_lora_rank,
                apart=self.plan.device == MIXING_BUG_DEVICE,
                engine_idle=self._engine_idle,
            )
        return True

    async def _serve_engine(self) -> None:
        """Start, register and supervise the engine, restarting it with backoff, until stopped."""
        if self.engine.kv_events_wanted():
            await self._start_kv_events()
        backoff_s = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            self._start_engine()
            if await self._wait_ready():
                await self._serve()
            if self._stop.is_set():
                break
            if self.engine.attached:
                logger.warning(
                    "%s stopped answering: waiting for it to answer again", self._base_url
                )
                continue
            code = self._proc.poll() if self._proc else None
            if self.settings.exit_when_engine_dies:
                logger.error("engine exited (code %s); exiting (the supervisor replaces us)", code)
                self.exit_code = 1
                break
            if time.monotonic() - started > 60:
                backoff_s = 1.0
            logger.error("engine exited (code %s); restarting in %.0fs", code, backoff_s)
            self.engine_restarts += 1
            await self._sleep(backoff_s)
            backoff_s = min(backoff_s * 2, constants.ENGINE_RESTART_BACKOFF_MAX_S)

    async def _start_kv_events(self) -> None:
        """The engine publishes on a socket only this user reaches; gateways read through us."""
        # mkdtemp: a directory only this user may enter (0700), whatever the socket's mode
        self._kv_dir = Path(tempfile.mkdtemp(prefix="fleetserve-kv-"))
        source = Path(self.settings.source)
        self.kv_events = KvEventService(
            self._kv_dir, self.engine_secret, source if source.is_dir() else None
        )
        await self.kv_events.start(self.settings.host, self.settings.kv_events_port)
        self.engine.kv_events_config = self.kv_events.engine_config()

    def _advertised_host(self) -> str:
        s = self.settings
        return s.advertise_host or (socket.gethostname() if s.host == "0.0.0.0" else s.host)

    def _place(self) -> ReplicaPlan:
        """This replica's GPUs (or cores), checked against the model before anything starts."""
        s = self.settings
        if s.ray_address:  # vLLM asks Ray for its ranks' GPUs, on whichever nodes have them
            return ReplicaPlan(s.served_name, 0, None)
        machine = discover_machine()
        facts = ModelFacts()
        if self.engine.uses_accelerator and s.source and (machine.gpus or Path(s.source).is_dir()):
            facts = read_model_facts(s.source)
        need = ReplicaNeed(
            s.served_name,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.stages_per_node,
            uses_accelerator=self.engine.uses_accelerator,
            facts=facts,
        )
        (plan,) = plan_placement([need], machine, s.device)
        self.engine.check_device(plan.device)
        if self.settings.sleep_after_s is not None:
            self.engine.check_sleep_mode(plan.device)
        where = ",".join(map(str, plan.gpu_ids)) if plan.gpu_ids else plan.cpu_bind or "any core"
        logger.info("placed on %s: %s", plan.device or "no accelerator", where)
        return plan

    def _environment(self) -> dict[str, str]:
        """The environment of the engine and of Ray's processes: no cluster token in it."""
        environment = self.engine.environment() | self.plan.environment()
        environment.pop(env.CLUSTER_TOKEN, None)
        environment.pop(env.ENGINE_SECRET, None)
        bind = env.cpu_threads_bind()
        if bind is not None:  # `up` (or the user) bound the whole machine
            environment[env.CPU_THREADS_BIND] = bind
        if len(self.settings.nodes) > 1:
            environment["RAY_ADDRESS"] = multinode.head_address(self.settings)
        elif self.settings.ray_address:
            environment["RAY_ADDRESS"] = self.settings.ray_address
        return environment

    # -- a replica spanning nodes ---------------------------------------------

    async def _start_ray_head(self) -> bool:
        """Rank 0: start the Ray head and wait until every node of the replica has joined."""
        s = self.settings
        ports = multinode.RayPorts.pick(s.nodes[0])
        logger.info("Ray head on port %d, its dashboard at %s", s.ray_port, ports.dashboard_url)
        self._ray = procs.spawn_tree(
            multinode.ray_start_command(s, ports),
            env=self._environment() | multinode.RAY_NODE_ENVIRONMENT,
        )
        started = last_progress = time.monotonic()
        while time.monotonic() - started < constants.RAY_NODES_TIMEOUT_S:
            if self._stop.is_set() or self._ray.poll() is not None:
                logger.error("the Ray head stopped (code %s)", self._ray.poll())
                return False
            joined = await multinode.alive_nodes(self._http, ports)
            if joined >= len(s.nodes):
                logger.info("Ray cluster at %s has all %d nodes", multinode.head_address(s), joined)
                return True
            if time.monotonic() - last_progress >= _PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                logger.info(
                    "waiting for nodes to join the Ray cluster: %d/%d after %.0fs",
                    joined,
                    len(s.nodes),
                    last_progress - started,
                )
            await self._sleep(1.0)
        logger.error("not every node joined within %.0fs", constants.RAY_NODES_TIMEOUT_S)
        return False

    async def _follow(self) -> None:
        """Rank > 0: keep a Ray node joined to the head's cluster until stopped."""
        backoff_s = 1.0
        while not self._stop.is_set():
            logger.info("joining the Ray cluster at %s", multinode.head_address(self.settings))
            me = self.settings.nodes[self.settings.node_rank]
            self._proc = procs.spawn_tree(
                multinode.ray_start_command(self.settings, multinode.RayPorts.pick(me)),
                env=self._environment() | multinode.RAY_NODE_ENVIRONMENT,
            )
            while self._engine_alive() and not self._stop.is_set():
                await self._sleep(_TICK_S)
            if self._stop.is_set():
                break
            code = self._proc.poll()
            logger.warning("Ray node exited (code %s); joining again in %.0fs", code, backoff_s)
            await self._sleep(backoff_s)
            backoff_s = min(backoff_s * 2, constants.ENGINE_RESTART_BACKOFF_MAX_S)

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
        if self.engine.attached:
            return self._answering
        return self._proc is not None and self._proc.poll() is None

    @property
    def ready(self) -> bool:
        """Serving: engine up, registered, not draining (the readiness probe's answer)."""
        return self.registered and self._engine_alive() and not self._stop.is_set()

    # -- engine --------------------------------------------------------------

    def _start_engine(self) -> None:
        if self.engine.attached:  # someone else runs it: nothing to start
            logger.info("attaching the %s server at %s", self.engine.name, self._base_url)
            return
        self._base_url = f"http://{self._advertised_host()}:{self._port}/v1"
        if self.engine.socket:  # a restart: the last engine's socket file is in the way
            Path(self.engine.socket).unlink(missing_ok=True)
        cmd = self.engine.command(self._port)
        environment = self._environment()
        if self.engine.api_key_variable:  # its environment, never its command line (ps)
            environment[self.engine.api_key_variable] = self.engine_secret
        logger.info("starting %s engine: %s", self.engine.name, " ".join(cmd))
        self._proc = procs.spawn_tree(cmd, env=environment)
        if self.adapters is not None:  # a new engine has none registered
            self.adapters.reset()
        if self.kv_events is not None:
            self.kv_events.engine_started()

    async def engine_metrics(self, timeout_s: float) -> bytes | None:
        """The engine's own /metrics page, None when it does not answer (200) in time."""
        if self._engine_http is None or not self._engine_alive():
            return None
        try:
            response = await self._engine_http.get("/metrics", timeout=timeout_s)
        except httpx.HTTPError as exc:
            logger.debug("cannot read the engine's metrics: %s", exc)
            return None
        return response.content if response.status_code == 200 else None

    async def _wait_ready(self) -> bool:
        assert self._engine_http is not None
        started = last_progress = time.monotonic()
        attached = self.engine.attached
        while time.monotonic() - started < self.settings.start_timeout_s:
            if self._stop.is_set() or not (attached or self._engine_alive()):
                return False
            if await self._answers():
                self._answering = True
                logger.info(
                    "engine ready after %.1fs at %s", time.monotonic() - started, self._base_url
                )
                return True
            if time.monotonic() - last_progress >= _PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                logger.info(
                    "%s ... %.0fs",
                    f"waiting for {self._base_url} to answer"
                    if attached
                    else f"loading {self.settings.source or self.settings.served_name} "
                    f"with {self.engine.name}",
                    last_progress - started,
                )
            await asyncio.sleep(0.5)
        logger.error(
            "engine not ready after %.0fs (start_timeout_s); restarting it",
            self.settings.start_timeout_s,
        )
        if self._proc is not None:
            await asyncio.to_thread(procs.stop, self._proc, constants.REAPER_STOP_GRACE_S)
        return False

    async def _answers(self, timeout_s: float = 5.0) -> bool:
        """Whether the engine's health check answers 200."""
        assert self._engine_http is not None
        url = self.engine.health_url(self._engine_url)
        try:
            response = await self._engine_http.get(url, timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _read_load(self, timeout_s: float = 5.0) -> WorkerLoad | None:
        metrics = await self.engine_metrics(timeout_s)
        if metrics is not None and self.adapters is not None:
            self.adapters.observe(metrics.decode())
        try:
            return parse_load(metrics.decode()) if metrics is not None else None
        except ValueError as exc:
            logger.debug("cannot read engine load: %s", exc)
            return None

    async def _engine_idle(self) -> bool:
        load = await self._read_load()
        return load is not None and load.running + load.waiting == 0

    # -- controller ----------------------------------------------------------

    def _registration(self, load: WorkerLoad, state: WorkerState) -> Registration:
        s = self.settings
        return Registration(
            worker_id=self.worker_id,
            model_names=s.model_names,
            base_url=self._base_url,
            engine=self.engine.name,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            device=self.plan.device or "",
            gpu_ids=list(self.plan.gpu_ids),
            nodes=max(len(s.nodes), 1),
            capacity=s.capacity or self.engine.capacity(),
            resumable=self.engine.resumable(),
            routing_policy=s.routing_policy,
            state=state,
            load=load,
            # an attached server's key is the gateways' own (upstream_key): no relay, no secret
            engine_secret=None if self.engine.attached else self.engine_secret,
            endpoints=self._endpoints,
            fallbacks=s.fallbacks,
            upstream_model=s.upstream_model,
            upstream_key=s.upstream_key,
            kv_events_url=(
                f"http://{self._advertised_host()}:{self.kv_events.port}"
                if self.kv_events is not None
                else None
            ),
            max_adapters=s.max_adapters,
            max_lora_rank=s.max_lora_rank if s.max_adapters else 0,
            adapters=self.adapters.report() if self.adapters else [],
            base_requests=self.adapters.base_requests if self.adapters else True,
        )

    def _auth(self) -> dict[str, str] | None:
        """The cluster token for the controller (read again per call: files rotate)."""
        return self._token.header() if self._token else None

    async def _register(self, load: WorkerLoad, state: WorkerState = WorkerState.READY) -> bool:
        body = self._registration(load, state).model_dump(mode="json")
        try:
            response = await self._http.post(
                f"{self._controller}/workers/register", json=body, headers=self._auth()
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
                logger.error(
                    "the controller at %s refuses this worker's cluster token (or its lack of "
                    "one): give it the cluster's (--cluster-token-file, $%s)",
                    self._controller,
                    env.CLUSTER_TOKEN,
                )
            else:
                logger.warning(
                    "cannot register with the controller at %s: %s", self._controller, exc
                )
            return False
        reply = RegistrationReply.model_validate(response.json())
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        self.registered = True
        logger.info(
            "registered as %s serving %s", self.worker_id, ", ".join(self.settings.model_names)
        )
        return True

    async def _heartbeat(self, load: WorkerLoad) -> HeartbeatReply:
        """Send one heartbeat; known=False when the controller does not know us."""
        adapters = self.adapters
        beat = Heartbeat(worker_id=self.worker_id, load=load)
        if adapters is not None:
            adapters.changed.clear()  # (what changes from now on goes in the next one)
            beat.adapters, beat.adapter_errors = adapters.report(), dict(adapters.errors)
            beat.base_requests = adapters.base_requests
        try:
            response = await self._http.post(
                f"{self._controller}/workers/heartbeat",
                json=beat.model_dump(mode="json"),
                headers=self._auth(),
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            logger.warning("heartbeat failed: %s", exc)
            return HeartbeatReply(known=True)  # the controller is away; keep serving
        reply = HeartbeatReply.model_validate(response.json())
        if adapters is not None:
            adapters.apply(reply.load_adapters, reply.unload_adapters)
        return reply

    async def _sleep_or_wake(self, sleeper: Sleeper, load: WorkerLoad, wake: bool) -> None:
        """The engine's sleep mode (workers/sleep.py): out of the table, asleep; awake, back."""
        assert self._engine_http is not None
        step = sleeper.step(load, wake)
        if step is Step.LEAVE and await self._register(load, WorkerState.SLEEPING):
            logger.info("idle for %.0fs: the engine goes to sleep", sleeper.sleep_after_s)
            sleeper.done(step)
        elif step is Step.SLEEP and await sleep(self._engine_http) is not None:
            sleeper.done(step)
        elif step is Step.WAKE:
            if sleeper.asleep:  # (awake already: only the registration failed last time)
                if (seconds := await wake_up(self._engine_http)) is None:
                    return
                sleeper.woke(seconds)
            if await self._register(load):
                sleeper.done(step)
                logger.info("a request is held for %s: awake", self.settings.model_names[0])

    async def _deregister(self) -> None:
        self.registered = False
        try:
            await self._http.delete(
                f"{self._controller}/workers/{self.worker_id}", headers=self._auth()
            )
        except httpx.HTTPError as exc:
            logger.warning("cannot deregister (the controller will expire us): %s", exc)

    async def _serve(self) -> None:
        """Registered life of a ready engine; returns when it died or a stop was asked."""
        registered = False
        next_beat = 0.0
        last_load = WorkerLoad()
        after_s = self.settings.sleep_after_s
        sleeper = self.sleeper = Sleeper(after_s) if after_s is not None else None
        assert self._engine_http is not None
        self._endpoints = await self.engine.endpoints(self._engine_http, self._engine_url)
        logger.info("the engine serves %s", ", ".join(self._endpoints))
        while not self._stop.is_set():
            if not self._engine_alive():
                if registered:
                    await self._deregister()
                return
            if time.monotonic() >= next_beat or (self.adapters and self.adapters.changed.is_set()):
                next_beat = time.monotonic() + self.heartbeat_interval_s
                if self.engine.attached:  # out of the table at the first check it fails
                    self._answering = await self._answers(self.heartbeat_interval_s / 2)
                    if not self._answering:
                        continue
                # A saturated engine answers /metrics slowly: the heartbeat must not wait for
                # it (the controller would expire a busy worker); the last load stands in.
                load = await self._read_load(self.heartbeat_interval_s / 2) or last_load
                last_load = load
                reply = await self._heartbeat(load) if registered else None
                if reply is None or not reply.known:
                    if registered:
                        logger.info("the controller forgot us (restarted?): registering again")
                    state = WorkerState.SLEEPING if sleeper and sleeper.leaving else None
                    registered = await self._register(load, state or WorkerState.READY)
                    if not registered:
                        next_beat = time.monotonic() + 1.0
                elif sleeper is not None:
                    await self._sleep_or_wake(sleeper, load, reply.wake)
            await self._sleep(_TICK_S)
        if registered:
            await self._drain()

    async def _drain(self) -> None:
        """Out of the routing table first, then wait for in-flight requests."""
        try:
            await self._http.post(
                f"{self._controller}/workers/{self.worker_id}/drain", headers=self._auth()
            )
        except httpx.HTTPError as exc:
            logger.warning("cannot tell the controller we drain: %s", exc)
        started = time.monotonic()
        await asyncio.sleep(constants.DRAIN_MIN_S)
        # (an attached server keeps running: its requests in flight are not cut off)
        while (
            not self.engine.attached
            and time.monotonic() - started < constants.DRAIN_TIMEOUT_S
            and self._engine_alive()
        ):
            load = await self._read_load()
            if load is not None and load.running + load.waiting == 0:
                break
            await asyncio.sleep(_TICK_S)
        logger.info("drained in %.1fs", time.monotonic() - started)
        await self._deregister()

    async def _shutdown(self) -> None:
        for what, proc in (("engine", self._proc), ("Ray node", self._ray)):
            if proc is not None and proc.poll() is None:
                logger.info("stopping the %s", what)
                await asyncio.to_thread(procs.stop, proc, constants.REAPER_STOP_GRACE_S)
        if self._relay is not None:  # after the engine: requests in flight were its to finish
            await self._relay.stop()
        if self._engine_http is not None:
            await self._engine_http.aclose()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        if self.kv_events is not None:
            await self.kv_events.stop()
        if self.adapters is not None:
            await self.adapters.close()
        if self._kv_dir is not None:
            shutil.rmtree(self._kv_dir, ignore_errors=True)
        logger.info("worker %s stopped", self.worker_id)


def run_worker(settings: WorkerSettings) -> int:
    try:
        import uvloop  # uvicorn's [standard] extra: the relay's bytes move through this loop
    except ImportError:
        return asyncio.run(Agent(settings).run())
    return int(uvloop.run(Agent(settings).run()))
