"""Start a cluster of fleetserve processes on this machine, and stop it in order.

One harness for `fleetserve up`, the tests and the benchmarks: each component is
a `fleetserve ...` process (started from its settings, fleetserve/cli/args.py)
with a log file of its own; a cluster is a controller, a gateway and workers
added one at a time. Stopping drains the workers first (all at once), then stops
the gateway, then the controller.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx

from controller.protocol import DeclaredModel, ModelState
from controller.settings import ControllerSettings
from fleetserve import constants, procs
from fleetserve.auth import client_tls, client_token
from fleetserve.cli.args import settings_argv
from fleetserve.cli.status import fetch_table
from fleetserve.env import CPU_THREADS_BIND
from fleetserve.errors import FleetserveError
from fleetserve.protocol import RouteTable
from gateway.settings import GatewaySettings
from workers.agent import free_port
from workers.settings import WorkerSettings

# A worker's drain, then its engine's stop, with room to spare.
WORKER_STOP_GRACE_S = constants.DRAIN_TIMEOUT_S + constants.REAPER_STOP_GRACE_S + 5
# Controller and gateway answer /health within seconds of starting; a busy 2-core machine
# can take ten times longer than an idle one.
COMPONENT_START_TIMEOUT_S = 60.0


class ComponentFailed(FleetserveError):
    """A component exited or did not come up; the message ends with its log's tail."""


def reachable(host: str) -> str:
    """The address to connect to a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.1
) -> Any:
    """Poll ``predicate`` until it returns something truthy (that value); TimeoutError at the
    deadline, saying what was waited for."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``, read from /proc."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


class Component:
    """One `fleetserve ARGS` process, its output in ``log_dir/NAME.log``."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        """``wrapper``: a command that runs it (``valgrind --tool=callgrind``, for bench/)."""
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        cmd = [*wrapper, sys.executable, "-m", "fleetserve.cli", *args]
        environment = {**os.environ, **(env or {})}
        self.proc = procs.spawn(cmd, env=environment, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_http(
        self,
        url: str,
        timeout_s: float = COMPONENT_START_TIMEOUT_S,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """Until ``url`` answers 200; ComponentFailed if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ComponentFailed(f"{self.name} exited; its log:\n{self.log_tail(40)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0, verify=verify).status_code == 200:
                    return
            time.sleep(0.2)
        raise ComponentFailed(
            f"{self.name} did not answer at {url} within {timeout_s:.0f}s; its log "
            f"({self.log_path}):\n{self.log_tail()}"
        )

    def kill_tree(self) -> list[int]:
        """SIGKILL this process and everything below it at once: a machine dying."""
        pids = [self.pid, *descendants(self.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
        return pids

    def stop(self, grace_s: float = constants.STOP_GRACE_S, signalled: bool = False) -> int:
        """SIGTERM (unless ``signalled``), wait, SIGKILL; nothing of its tree outlives it."""
        tree = descendants(self.pid)
        code = procs.stop(self.proc, grace_s, signalled)
        for pid in tree:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()
        return code


class Cluster:
    """A controller and a gateway from their settings, and workers added one at a time.

    ``env`` is added to every component's environment; ``log_level`` is each one's
    `fleetserve --log-level`. ``cluster_token_file``: every component is given it (its
    path, never the token, on their command lines); without it they find the token
    where fleetserve/auth.py says, or run without one. With TLS settings (the controller's
    and gateway's certificates, the gateway's ``ca_file``), URLs are https and every
    client here (workers, this harness) trusts ``ca_file``. ``controller_url``: a controller
    that runs elsewhere, which workers join (start_controller and start_gateway are not
    called then).
    """

    def __init__(
        self,
        log_dir: Path,
        controller: ControllerSettings,
        gateway: GatewaySettings,
        env: Mapping[str, str] | None = None,
        log_level: str | None = None,
        cluster_token_file: Path | None = None,
        controller_url: str | None = None,
    ) -> None:
        self.log_dir = log_dir
        token_file = str(cluster_token_file) if cluster_token_file else None
        self.cluster_token_file = token_file
        if token_file:
            controller = controller.model_copy(update={"cluster_token_file": token_file})
            gateway = gateway.model_copy(update={"cluster_token_file": token_file})
        self.token = client_token(token_file)
        self.controller_settings = controller
        self.gateway_settings = gateway
        self.env = dict(env or {})
        self._global = ["--log-level", log_level] if log_level else []
        scheme = "https" if controller.tls_cert_file else "http"
        self.controller_url = (
            controller_url or f"{scheme}://{reachable(controller.host)}:{controller.port}"
        )
        gateway.controller_url = gateway.controller_url or self.controller_url
        scheme = "https" if gateway.tls_cert_file else "http"
        self.gateway_url = f"{scheme}://{reachable(gateway.host)}:{gateway.port}"
        self.ca_file = gateway.ca_file
        self.verify = client_tls(self.ca_file)
        self.components: list[Component] = []
        self.workers: list[Component] = []
        self.controller: Component | None = None
        self.gateway: Component | None = None

    @classmethod
    def on_free_ports(
        cls,
        log_dir: Path,
        controller: ControllerSettings | None = None,
        gateway: GatewaySettings | None = None,
        **options: Any,
    ) -> Self:
        """A cluster on free loopback ports (the settings' ports are replaced), started."""
        controller = (controller or ControllerSettings()).model_copy(
            update={"host": "127.0.0.1", "port": free_port("127.0.0.1")}
        )
        gateway = (gateway or GatewaySettings()).model_copy(
            update={"host": "127.0.0.1", "port": free_port("127.0.0.1")}
        )
        cluster = cls(log_dir, controller, gateway, **options)
        cluster.start_controller()
        cluster.start_gateway()
        return cluster

    @classmethod
    def one_model(
        cls,
        log_dir: Path,
        worker: WorkerSettings,
        replicas: int = 1,
        gateway: GatewaySettings | None = None,
        **options: Any,
    ) -> Self:
        """A cluster on free ports with ``replicas`` workers of ``worker``, once all are routed.

        More than one replica: each gets a core of its own, as `fleetserve up` places CPU
        engines (workers/placement.py; CPU engines sharing cores stall each other).
        """
        cluster = cls.on_free_ports(log_dir, gateway=gateway, **options)
        cores = sorted(os.sched_getaffinity(0))
        for i in range(replicas):
            bind = {CPU_THREADS_BIND: str(cores[i % len(cores)])} if replicas > 1 else {}
            cluster.add_replica(worker.model_copy(), f"worker-{i}", bind)
        cluster.wait_routed(worker.served_name, replicas, timeout_s=600)
        return cluster

    def start(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> Component:
        """Any `fleetserve` process, as part of this cluster (stopped with it)."""
        component = Component(
            name, [*self._global, *args], self.log_dir, {**self.env, **(env or {})}
        )
        self.components.append(component)
        return component

    def start_controller(self) -> Component:
        """The controller, once it answers (again, after a restart)."""
        self.controller = self.start(
            f"controller-{len(self.components)}" if self.controller else "controller",
            ["controller", *settings_argv(self.controller_settings)],
        )
        self.controller.wait_http(f"{self.controller_url}/health", verify=self.verify)
        return self.controller

    def start_gateway(self) -> Component:
        self.gateway = self.start("gateway", ["gateway", *settings_argv(self.gateway_settings)])
        self.gateway.wait_http(f"{self.gateway_url}/health", verify=self.verify)
        return self.gateway

    def add_replica(
        self, settings: WorkerSettings, name: str, env: Mapping[str, str] | None = None
    ) -> Component:
        """A worker of ``settings`` (its controller: this cluster's); ``name`` names its log."""
        settings.controller_url = self.controller_url
        settings.ca_file = settings.ca_file or self.ca_file
        argv = settings_argv(settings, skip=("engine_args",))
        return self.start_worker(name, [*argv, "--", *settings.engine_args], env)

    def start_worker(
        self, name: str, args: list[str], env: Mapping[str, str] | None = None
    ) -> Component:
        """`fleetserve worker ARGS`, drained with the cluster's other workers."""
        if self.cluster_token_file and "--cluster-token-file" not in args:
            args = ["--cluster-token-file", self.cluster_token_file, *args]
        if self.ca_file and "--ca-file" not in args:
            args = ["--ca-file", self.ca_file, *args]
        worker = self.start(name, ["worker", *args], env)
        self.workers.append(worker)
        return worker

    def table(self) -> RouteTable:
        return fetch_table(self.controller_url, self.token, self.ca_file)

    def routes(self) -> RouteTable:
        """The table as gateways get it (the engines' secrets in it), for benchmarks and tests
        that reach engines the way a gateway does."""
        response = httpx.get(
            f"{self.controller_url}/routes",
            params={"timeout_s": 0},
            headers=self.token.header() if self.token else None,
            verify=self.verify,
            timeout=5.0,
        )
        response.raise_for_status()
        return RouteTable.model_validate_json(response.content)

    def _control(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A call to the controller's API, with the cluster token; HTTPError if it fails."""
        response = httpx.request(
            method,
            f"{self.controller_url}{path}",
            headers=self.token.header() if self.token else None,
            verify=self.verify,
            timeout=5.0,
            **kwargs,
        )
        response.raise_for_status()
        return response

    def models(self) -> list[ModelState]:
        """Every model the controller knows (declared ones with their demand), its state."""
        return [ModelState.model_validate(m) for m in self._control("GET", "/models").json()]

    def declare(self, model: DeclaredModel) -> None:
        self._control("PUT", f"/models/{model.name}", json=model.model_dump(mode="json"))

    def stop_workers(self, workers: list[Component]) -> None:
        """Drain ``workers`` together and stop them; they leave the cluster."""
        for worker in workers:
            if worker.alive():
                worker.proc.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.stop(WORKER_STOP_GRACE_S, signalled=True)
            self.workers.remove(worker)
            self.components.remove(worker)

    def gateway_health(self, url: str | None = None) -> dict[str, Any]:
        """A gateway's /health (no API key needed there): its table version and models."""
        url = f"{url or self.gateway_url}/health"
        health: dict[str, Any] = httpx.get(url, timeout=5.0, verify=self.verify).json()
        return health

    def gateway_routes(self, table: RouteTable, url: str | None = None) -> bool:
        """True once the gateway (this cluster's, or the one at ``url``) routes ``table``:
        it holds that version of the controller's table (or a newer one) and every name."""
        try:
            health = self.gateway_health(url)
            version, served = health["routing_table_version"], set(health["models"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return False
        names = {name for worker in table.workers for name in worker.model_names}
        return version is not None and int(version) >= table.version and names <= served

    def ready_workers(self, model: str) -> set[str]:
        return {
            w.worker_id
            for w in self.table().workers
            if model in w.model_names and w.state.value == "ready"
        }

    def wait_routed(self, model: str, count: int, timeout_s: float = 240) -> set[str]:
        """Until ``count`` workers of ``model`` are ready and the gateway routes to all of them
        (it learns the table within one long-poll); their ids."""
        ids: set[str] = wait_until(
            lambda: len(ids := self.ready_workers(model)) == count and ids,
            timeout_s,
            f"{count} ready workers of {model}",
            0.5,
        )
        table = self.table()
        wait_until(
            lambda: self.gateway_routes(table),
            constants.WATCH_TIMEOUT_S + 10,
            f"the gateway to route {model}",
        )
        return ids

    def stop(self) -> None:
        """Workers drain together, then the gateway stops, then the controller."""
        running = [worker for worker in self.workers if worker.alive()]
        for worker in running:
            worker.proc.send_signal(signal.SIGTERM)
        for worker in running:
            worker.stop(WORKER_STOP_GRACE_S, signalled=True)
        for component in reversed(self.components):
            if component.alive():
                # the gateway's streams may run their drain_timeout_s (workers drained already)
                grace_s = constants.STOP_GRACE_S
                if component is self.gateway:
                    grace_s = max(grace_s, self.gateway_settings.drain_timeout_s + 5)
                component.stop(grace_s)
