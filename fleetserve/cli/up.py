"""`fleetserve up`: a whole cluster on this machine (controller, gateway, every replica)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml
from rich.console import Console

from controller.protocol import DeclaredModel
from controller.settings import ControllerSettings
from fleetserve import constants, env, paths
from fleetserve.auth import ensure_token_file
from fleetserve.cli.adapter import local_source
from fleetserve.cli.args import validation_context
from fleetserve.cli.cluster import ClusterConfig, Load, ModelSpec, load_cluster_file, parse_cluster
from fleetserve.cli.harness import Cluster, Component, ComponentFailed, reachable
from fleetserve.cli.nodeplan import Stage, share_nodes
from fleetserve.cli.ondemand import Action, OnDemand
from fleetserve.cli.placing import Room, place_cluster
from fleetserve.cli.status import make_console, workers_table
from fleetserve.cli.targets import Target, check
from fleetserve.errors import ConfigError
from fleetserve.protocol import RouteTable
from gateway.settings import GatewaySettings, KeysFile, load_keys_file
from workers.adapters import inspect_adapter
from workers.engines import Engine
from workers.inventory import discover_machine
from workers.settings import Device, WorkerSettings, engine_args_from_flags, slug
from workers.vllm.demo_model import DEMO_MODEL_NAME


def worker_settings(
    spec: ModelSpec,
    host: str,
    advertise_host: str | None,
    device: Device | None = None,
    replica: int = 0,
) -> WorkerSettings:
    """The settings of replica ``replica`` of ``spec`` (its controller: whoever starts it)."""
    return WorkerSettings(
        engine=spec.engine,
        source=spec.source,
        served_name=spec.name,
        aliases=spec.aliases,
        tensor_parallel_size=spec.tensor_parallel_size,
        pipeline_parallel_size=spec.pipeline_parallel_size,
        device=device or Device.AUTO,
        host=host,
        advertise_host=advertise_host,
        routing_policy=spec.routing_policy,
        fallbacks=spec.fallbacks,
        url=spec.url[replica] if spec.url else None,  # an attached server per replica
        upstream_model=spec.upstream_model,
        upstream_key=spec.upstream_key,
        endpoints=spec.endpoints,
        capacity=spec.capacity,
        engine_args=spec.engine_flags(),
        start_timeout_s=spec.start_timeout_s,
        max_adapters=spec.adapter_slots,
        max_lora_rank=spec.max_lora_rank,
        sleep_after_s=spec.sleep_after_s,
    )


def _gateway_settings(g: GatewaySettings, log_dir: Path) -> GatewaySettings:
    """Keys written in the cluster file reach the gateway as a keys file (0600)."""
    if not g.keys:
        return g
    keys_path = log_dir / "keys.yaml"
    keys_path.write_text(yaml.safe_dump(KeysFile(keys=g.keys).model_dump(mode="json")))
    keys_path.chmod(0o600)
    return g.model_copy(update={"keys": [], "keys_file": str(keys_path)})


def _controller_settings(cluster: ClusterConfig, log_dir: Path) -> ControllerSettings:
    """The cluster's models are declared from the start: the controller reads them from a
    file (as written here, the demo model's made source included) and gateways hold their
    requests while their workers start, instead of 404."""
    models_path = log_dir / "models.yaml"
    models = [spec.model_dump(mode="json", exclude_none=True) for spec in cluster.models]
    models_path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return cluster.controller.model_copy(update={"models_file": str(models_path)})


@dataclass
class NodePart:
    """This machine's part of a cluster of several (`up --nodes`, `up --controller-url`)."""

    controller_url: str | None  # the controller to join; None: this node starts it and a gateway
    replicas: dict[str, int]  # whole replicas to start here, by model
    stages: list[Stage] = field(default_factory=list)  # parts of replicas spanning nodes
    ray_port: int = constants.RAY_PORT


def run_local_cluster(
    cluster: ClusterConfig,
    device: Device = Device.AUTO,
    advertise_host: str | None = None,
    log_dir: Path | None = None,
    part: NodePart | None = None,
) -> int:
    """Start everything, report workers as they become ready, stop it all on Ctrl-C.

    ``part``: start only this node's share of the file (and the controller and gateway
    unless it joins one). Raises ConfigError (before starting anything) when the
    cluster cannot run here.
    """
    if part is not None and any(spec.load is Load.ON_DEMAND for spec in cluster.models):
        raise ConfigError(
            "load: on_demand starts replicas from the one `fleetserve up` beside the "
            "controller; a cluster of several nodes starts every replica it places"
        )
    console = make_console()
    for spec in cluster.models:
        Engine.named(spec.engine).check_installed()
        for adapter in spec.adapters:  # a bad one is refused here, not by a worker
            adapter.source = local_source(adapter.source)
            inspect_adapter(adapter.source, spec.max_lora_rank)
        if not spec.source and not spec.url:
            with console.status("preparing the model (the demo model: made on first run)"):
                spec.source = Engine.named(spec.engine).resolve_source(spec.source)
    counts = part.replicas if part else {spec.name: spec.replicas for spec in cluster.models}
    specs = [
        spec.model_copy(update={"replicas": counts[spec.name]})
        for spec in cluster.models
        if counts.get(spec.name)
    ]
    placed, room = place_cluster(specs, device) if specs else ([], None)
    for spec in cluster.models:  # once it all fits: hub models pulled (a 401 refused here)
        spec.source = Engine.named(spec.engine).resolve_source(spec.source)
    log_dir = log_dir or paths.logs_dir() / datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)

    g = cluster.gateway
    # Every component gets the cluster token: the one given ($FLEETSERVE_CLUSTER_TOKEN, which
    # they inherit: nodes of one cluster share it), else this machine's file, made once (0600).
    token_file = None if env.cluster_token() else ensure_token_file(paths.cluster_token_file())
    joins = part.controller_url if part else None
    local = Cluster(
        log_dir,
        _controller_settings(cluster, log_dir),
        _gateway_settings(g, log_dir),
        cluster_token_file=token_file,
        controller_url=joins,
    )
    # Workers listen where the gateway does; they register the address others reach them at.
    advertise_host = advertise_host or reachable(g.host)
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    owners: dict[Component, ModelSpec] = {}  # each worker's model
    on_demand = OnDemandReplicas(
        local,
        console,
        {spec.name: spec for spec in cluster.models if spec.load is Load.ON_DEMAND},
        owners,
        room,
    )
    try:
        if joins is None:
            local.start_controller()
            local.start_gateway()
            endpoint = f"http://{advertise_host}:{g.port}/v1"
            console.print(
                f"fleetserve gateway: [bold]{endpoint}[/bold]   controller: {local.controller_url}"
            )
        else:
            console.print(f"workers of this node register with {joins}")
        for spec, plan in placed:
            name = f"worker-{slug(spec.name)}-{plan.replica}"
            settings = worker_settings(spec, g.host, advertise_host, plan.device, plan.replica)
            where = ",".join(map(str, plan.gpu_ids)) or plan.cpu_bind
            if spec.name in on_demand.specs:
                on_demand.replicas[spec.name].append((settings, name, plan.environment()))
                shown = "taking turns" if room and room.units(spec.name) else where
                console.print(f"{name}: on demand{f' ({plan.device} {shown})' if shown else ''}")
                continue
            owners[local.add_replica(settings, name, plan.environment())] = spec
            if where:
                console.print(f"{name}: {plan.device} {where}")
        by_name = {spec.name: spec for spec in cluster.models}
        for stage in part.stages if part else []:
            settings = worker_settings(by_name[stage.model], g.host, advertise_host, device)
            settings.nodes, settings.node_rank = list(stage.nodes), stage.node_rank
            settings.ray_port = part.ray_port if part else constants.RAY_PORT
            name = f"worker-{slug(stage.model)}-{stage.replica}-node{stage.node_rank}"
            local.add_replica(settings, name)
            console.print(f"{name}: node {stage.node_rank} of {','.join(stage.nodes)}")
        console.print(f"logs: {log_dir}")
        if token_file is not None:
            console.print(
                f"cluster token: {token_file} (this machine's fleetserve commands use it)"
            )
        # Where the controller runs, every replica of the file registers with it (on-demand
        # ones when asked for); on a node that joined one, this node's: whole replicas and the
        # first node of spanning ones.
        expected = sum(s.replicas for s in cluster.models if s.name not in on_demand.specs)
        mine = None
        if part is not None and joins is not None:
            expected = sum(counts.values()) + sum(s.node_rank == 0 for s in part.stages)
            mine = advertise_host
        _report_until_stopped(console, local, expected, lambda: stopping, on_demand, owners, mine)
    except ComponentFailed as exc:
        console.print(f"[red]{exc}[/red]", markup=False, highlight=False)
        return 1
    finally:
        console.print("stopping: draining workers, then gateway and controller")
        local.stop()
        console.print("stopped")
    return 0


class OnDemandReplicas:
    """The replicas of on-demand models: started and stopped as fleetserve/cli/ondemand.py
    decides, from the controller's view, once per poll of `up`."""

    def __init__(
        self,
        local: Cluster,
        console: Console,
        specs: dict[str, ModelSpec],
        owners: dict[Component, ModelSpec],
        room: Room | None = None,
    ) -> None:
        """``owners``: each worker's model, where the workers started here are added.
        ``room``: what models that do not fit together share (None: they all fit)."""
        self.local = local
        self.console = console
        self.specs = specs
        self.owners = owners
        #: Model -> its replicas' (settings, log name, environment), as placed.
        self.replicas: dict[str, list[tuple[WorkerSettings, str, dict[str, str]]]] = {
            name: [] for name in specs
        }
        self.running: dict[str, list[Component]] = {}
        self.room = room
        self.held: dict[str, set[int]] = {}  # the Room's units each running model holds
        self.decider = OnDemand(
            {name: spec.idle_timeout_s or 0 for name, spec in specs.items()},
            {name: room.units(name) for name in specs} if room else None,
            room.capacity if room else None,
        )

    def _declare(self, model: DeclaredModel) -> None:
        """What gateways tell held requests (starting, scaled to zero). Best effort: requests
        are held either way, only the wording of a 503 depends on it."""
        try:
            self.local.declare(model)
        except httpx.HTTPError as exc:
            self.console.print(f"[yellow]could not declare {model.name}: {exc}[/yellow]")

    def tick(self, table: RouteTable) -> None:
        if not self.specs:
            return
        try:
            decisions = self.decider.decide(time.monotonic(), self.local.models(), table.workers)
        except httpx.HTTPError:
            return  # the controller is restarting: next poll
        for decision in decisions:
            name = decision.model
            spec = self.specs[name]
            if decision.action is Action.START:
                self.console.print(f"on demand: starting {name} ({decision.reason})")
                self._declare(spec.declaration().model_copy(update={"replicas": spec.replicas}))
                environments = [env for _, _, env in self.replicas[name]]
                if self.room is not None:  # where it fits beside the running ones now
                    taken = set().union(*self.held.values())
                    plans, self.held[name] = self.room.plans(name, taken)
                    environments = [plan.environment() for plan in plans]
                self.running[name] = [
                    self.local.add_replica(settings.model_copy(), log_name, env)
                    for (settings, log_name, _), env in zip(
                        self.replicas[name], environments, strict=True
                    )
                ]
                self.owners.update(dict.fromkeys(self.running[name], spec))
            elif decision.action is Action.READY:
                self.console.print(f"on demand: {name} ready {decision.reason} (cold start)")
            elif decision.action is Action.WAIT:
                self.console.print(f"on demand: {name} {decision.reason}")
                self._declare(spec.declaration().model_copy(update={"note": decision.reason}))
            else:
                self.console.print(f"on demand: stopping {name} ({decision.reason})")
                self._declare(spec.declaration())  # none wanted: scaled to zero
                stopped = self.running.pop(name, [])
                self.held.pop(name, None)
                self.local.stop_workers(stopped)
                for worker in stopped:
                    self.owners.pop(worker, None)
                self.console.print(f"on demand: {name} stopped")


def _report_until_stopped(
    console: Console,
    local: Cluster,
    expected: int,
    stopping: Callable[[], bool],
    on_demand: OnDemandReplicas,
    owners: dict[Component, ModelSpec],
    host: str | None = None,
) -> None:
    """Print workers as they register, then a table once ``expected`` are ready (``host``:
    only workers at that address count, on a node that joined another's controller)."""
    started = time.monotonic()
    seen: set[str] = set()
    announced_ready = False
    last_progress = started
    reported: set[Component] = set()
    while not stopping():
        for component in [c for c in local.components if not c.alive() and c not in reported]:
            reported.add(component)
            console.print(
                f"[red]{component.name} exited[/red] (code {component.proc.returncode}); its log:"
            )
            console.print(component.log_tail(), markup=False, highlight=False)
            if component not in local.workers:
                return
            spec = owners.get(component)
            if spec is not None:  # held requests for its model learn why they wait
                note = f"{component.name} exited (code {component.proc.returncode})"
                wanted = {"replicas": spec.replicas, "note": note}
                with contextlib.suppress(httpx.HTTPError):
                    local.declare(spec.declaration().model_copy(update=wanted))
        try:
            table = local.table()
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        workers = [w for w in table.workers if host is None or httpx.URL(w.base_url).host == host]
        seen &= {worker.worker_id for worker in workers}  # gone: reported when back
        for worker in workers:
            if worker.worker_id not in seen:
                seen.add(worker.worker_id)
                elapsed = time.monotonic() - started
                console.print(
                    f"[green]ready[/green] {worker.model_names[0]} ({worker.engine}) "
                    f"{worker.worker_id} at {worker.base_url}  after {elapsed:.0f}s"
                )
        on_demand.tick(table)
        ready = len([w for w in workers if w.model_names[0] not in on_demand.specs])
        routed = host is not None or local.gateway_routes(table)
        if ready >= expected and not announced_ready and routed:
            announced_ready = True
            if expected:
                console.print(workers_table(table))
                console.print("all workers ready; press Ctrl-C to stop")
            else:
                console.print(
                    "every model is on demand: each starts on its first request; "
                    "press Ctrl-C to stop"
                )
        elif ready < expected and time.monotonic() - last_progress > 10:
            last_progress = time.monotonic()
            elapsed = last_progress - started
            console.print(f"waiting for workers: {ready}/{expected} ready after {elapsed:.0f}s")
        time.sleep(0.5)


# -- the `fleetserve up` command ------------------------------------------------------


def default_cluster() -> ClusterConfig:
    """The cluster `fleetserve up` runs with no file: the tiny demo model on vLLM."""
    return parse_cluster(
        {"models": [{"name": DEMO_MODEL_NAME, "engine": "vllm"}]}, origin="default cluster"
    )


def _one_model_cluster(args: argparse.Namespace) -> ClusterConfig:
    """`up --source SOURCE ...`: the cluster file one would write for a single model."""
    ranks = args.tensor_parallel_size * args.pipeline_parallel_size
    replicas = args.replicas or max(1, len(discover_machine().gpus) // ranks)  # fill the GPUs
    source = Path(args.source).expanduser()
    name = args.name or (source.name if source.is_dir() else args.source)
    spec = {
        "name": name,
        "engine": args.engine,
        "source": str(source) if source.is_dir() else args.source,
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "replicas": replicas,
        "engine_args": engine_args_from_flags(args.engine_args),
    }
    return parse_cluster({"models": [spec]}, origin="--source", context=validation_context())


def _keys(cluster: ClusterConfig, extra: Path | None) -> None:
    """`up --keys-file`: the gateway's keys. With keys in the cluster file too, both count
    (SkyPilot's API_KEY next to the file's keys); alone, the file is re-read as it changes."""
    g = cluster.gateway
    if extra is None:
        return
    if not g.keys and not g.keys_file:
        g.keys_file = str(extra)
        return
    inline = g.keys or load_keys_file(Path(g.keys_file or ""))
    merged = KeysFile(keys=[*inline, *load_keys_file(extra)])  # names stay unique
    g.keys_file = None
    g.keys = merged.keys


def _node_part(cluster: ClusterConfig, args: argparse.Namespace) -> NodePart | None:
    """`--nodes`/`--node-rank` and `--controller-url`: this node's share of the file."""
    if not args.nodes and not args.controller_url:
        return None
    nodes = WorkerSettings.model_validate(
        {"served_name": "x", "nodes": args.nodes or ["127.0.0.1"]}
    ).nodes  # split as SkyPilot gives them (newlines) or with commas
    if not 0 <= args.node_rank < len(nodes):
        raise ConfigError(f"--node-rank {args.node_rank} is not a position in --nodes {nodes}")
    machine = discover_machine()
    shares = share_nodes(
        cluster.models,
        nodes,
        len(machine.gpus),
        lambda spec: bool(machine.gpus) and Engine.named(spec.engine).uses_accelerator,
    )
    share = shares[args.node_rank]
    controller_url = args.controller_url
    if controller_url is None and args.node_rank > 0:
        scheme = "https" if cluster.controller.tls_cert_file else "http"
        controller_url = f"{scheme}://{nodes[0]}:{cluster.controller.port}"
    return NodePart(controller_url, share.replicas, share.stages, args.ray_port)


def cmd_up(args: argparse.Namespace) -> int:
    if args.file:
        if args.engine_args:
            raise ConfigError(
                "engine flags after `--` go with --source; in a cluster file, give each model "
                "its engine_args"
            )
        cluster = load_cluster_file(args.file, context=validation_context())
    elif args.source:
        cluster = _one_model_cluster(args)
    else:
        cluster = default_cluster()
    check(cluster, Target(args.target), str(args.file or "the cluster"))
    if args.port is not None:
        cluster.gateway.port = args.port
    if args.controller_port is not None:
        cluster.controller.port = args.controller_port
    if args.host is not None:
        cluster.gateway.host = cluster.controller.host = args.host
    _keys(cluster, args.keys_file)
    part = _node_part(cluster, args)
    advertise_host = args.advertise_host
    if part is not None and args.nodes and advertise_host is None:
        advertise_host = WorkerSettings.model_validate(
            {"served_name": "x", "nodes": args.nodes, "node_rank": args.node_rank}
        ).nodes[args.node_rank]
    return run_local_cluster(cluster, args.device, advertise_host, args.log_dir, part)


def register(sub: Any) -> None:
    up = sub.add_parser(
        "up",
        help="Run controller, gateway and every worker of a cluster file on this machine.",
        description="Start a whole cluster here; Ctrl-C stops it cleanly. Without -f or "
        "--source: the tiny demo model on vLLM (made locally on first use). With --source, "
        "flags after `--` go to the engine: `fleetserve up --source M -- --max-model-len 4096`.",
    )
    source = up.add_mutually_exclusive_group()
    source.add_argument(
        "-f", "--file", type=Path, help="Cluster YAML file (default: the demo cluster)."
    )
    source.add_argument(
        "--source",
        "--model",
        dest="source",
        help="Serve this one model (hub id or local directory) instead of a file.",
    )
    one = up.add_argument_group("with --source")
    one.add_argument("--name", help="The name clients ask for (default: the model id).")
    one.add_argument(
        "--engine",
        choices=sorted(Engine.registry),
        help=f"Default: {Engine.default_name}.",
    )
    one.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica.")
    one.add_argument(
        "--pipeline-parallel-size", type=int, default=1, help="Pipeline stages per replica."
    )
    one.add_argument(
        "--replicas", type=int, help="Replicas (default: as many as the GPUs hold, at least 1)."
    )
    up.add_argument(
        "--device",
        type=Device,
        choices=list(Device),
        default=Device.AUTO,
        help="auto: the GPUs when there are any, else vLLM's CPU build for single-rank models; "
        "cpu: vLLM's CPU build even for TP/PP > 1 (one core per rank). Default: auto.",
    )
    up.add_argument("--port", type=int, help="Gateway port (overrides the file; default 8000).")
    up.add_argument("--controller-port", type=int, help="Controller port (default 8001).")
    up.add_argument(
        "--host",
        help="Address gateway, controller and engines listen on (default 127.0.0.1; "
        "0.0.0.0 to be reached from other machines).",
    )
    up.add_argument(
        "--advertise-host",
        help="Address other machines reach this one at; workers register with it "
        "(default: --host, or 127.0.0.1 for 0.0.0.0).",
    )
    up.add_argument(
        "--log-dir", type=Path, help="Where component logs go (default: under ~/.cache/fleetserve)."
    )
    up.add_argument(
        "--keys-file",
        type=Path,
        help="The gateway's API keys (`fleetserve key new`); with keys in the cluster file too, "
        "both are accepted.",
    )
    up.add_argument(
        "--target",
        choices=[t.value for t in (Target.LOCAL, Target.SKYPILOT, Target.SKYSERVE)],
        default=Target.LOCAL.value,
        help="Where this runs, for the fields it refuses (deploy/ runs it as skypilot or "
        "skyserve). Default: local.",
    )
    several = up.add_argument_group(
        "several nodes",
        "Each node runs `up` with the same file; each starts its share of the replicas "
        "(deploy/cluster.yaml).",
    )
    several.add_argument(
        "--nodes",
        action="append",
        help="Every node's address, the head (controller and gateway) first; repeat, or one "
        "comma/newline separated list ($SKYPILOT_NODE_IPS).",
    )
    several.add_argument(
        "--node-rank", type=int, default=0, help="This node's position in --nodes (default 0)."
    )
    several.add_argument(
        "--controller-url",
        help="Join the cluster of this controller: start no controller or gateway, only this "
        "node's workers (deploy/worker.yaml).",
    )
    several.add_argument(
        "--ray-port",
        type=int,
        default=constants.RAY_PORT,
        help="Port of the Ray head of each replica spanning nodes (default: %(default)s).",
    )
    up.set_defaults(func=cmd_up)
