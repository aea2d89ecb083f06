"""`fleetserve ray deploy|status|down`: every model's replicas as Ray Serve deployments.

One Serve application per model (``fleetserve-<model>``), one replica per
worker (replica.py). Ray places replicas on nodes with the GPUs
they need, replaces those whose worker died, scales them between the model's
``autoscaling`` bounds (autoscaling.py decides), and on a new
deploy of a changed model replaces its replicas a few at a time, each
draining before it stops. Serve's HTTP proxy is not started: the fleetserve
gateway is the way in and talks to the engines directly.

Every model is declared with the controller (``PUT /models/NAME``, replicas: its
minimum), so that gateways hold its requests while Ray starts replicas; a model
with ``min_replicas: 0`` (or ``load: on_demand``) starts with none and scales
from zero on the demand the gateways report (autoscaling.py).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from typing import Any
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.table import Table

from fleetserve import __version__, constants
from fleetserve.auth import ClusterToken, client_tls
from fleetserve.cli.cluster import Autoscaling, ClusterConfig, Load, ModelSpec
from fleetserve.cli.status import describe_failure, fetch_table
from fleetserve.errors import ConfigError
from workers.engines import Engine
from workers.settings import slug

logger = logging.getLogger(__name__)

APP_PREFIX = "fleetserve-"
NAMESPACE = "fleetserve"
_POLICY = "fleetserve.ray.autoscaling:ServePolicy"


def app_name(spec: ModelSpec) -> str:
    return APP_PREFIX + slug(spec.name)


def deployment_options(
    spec: ModelSpec,
    cluster_has_gpus: bool,
    controller_url: str | None = None,
    ca_file: str | None = None,
) -> dict[str, Any]:
    """Serve deployment options for one model: resources, health checks, replicas.

    ``controller_url``: where a model that scales to zero reads its demand (autoscaling.py).
    """
    from fleetserve.ray.replica import SHUTDOWN_GRACE_S, spans_nodes

    ranks = spec.tensor_parallel_size * spec.pipeline_parallel_size
    # A replica spanning nodes holds no GPU itself: vLLM reserves one per rank from Ray.
    accelerated = Engine.named(spec.engine).uses_accelerator and not spans_nodes(spec)
    actor: dict[str, Any] = {
        # vLLM on the CPU build: one core per rank, so Ray does not stack replicas on a core.
        "num_cpus": ranks if accelerated and not cluster_has_gpus else 0,
        "num_gpus": ranks if accelerated and cluster_has_gpus else 0,
        "runtime_env": {
            "env_vars": {
                "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": str(
                    constants.RAY_METRICS_PUSH_INTERVAL_S
                )
            }
        },
    }
    options: dict[str, Any] = {
        "name": slug(spec.name),
        "ray_actor_options": actor,
        "health_check_period_s": constants.RAY_HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": constants.RAY_HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": SHUTDOWN_GRACE_S,
    }
    on_demand = spec.load is Load.ON_DEMAND
    scaling = spec.autoscaling
    if scaling is None and not on_demand:
        options["num_replicas"] = spec.replicas
    else:
        # on demand: from zero to its replicas, back to zero after idle_timeout_s
        scaling = scaling or Autoscaling(max_replicas=spec.replicas)
        lowest = 0 if on_demand else scaling.min_replicas
        policy = {"model": spec.name, "controller_url": controller_url, "min_replicas": lowest}
        options["autoscaling_config"] = {
            "min_replicas": lowest,
            "initial_replicas": lowest,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
            # Deprecated in Serve for the env var set above, but still what it checks
            # look_back_period_s against.
            "metrics_interval_s": constants.RAY_METRICS_PUSH_INTERVAL_S,
            "policy": {
                "policy_function": _POLICY,
                "policy_kwargs": {**policy, "ca_file": ca_file} if controller_url else {},
            },
        }
        if on_demand:
            options["autoscaling_config"]["downscale_to_zero_delay_s"] = spec.idle_timeout_s
    return options


def _connect(address: str | None) -> None:
    import ray

    if address is None or "://" not in address:
        # Check the address first: ray.init retries an unreachable one for minutes, and "auto"
        # can name a cluster that is gone (Ray's file of the last one started here).
        from ray._private.services import canonicalize_bootstrap_address

        where = f"at {address}" if address else "running here"
        try:
            resolved = canonicalize_bootstrap_address(address or "auto")
            if resolved is None:
                raise ConnectionError("none was started on this machine")
            host, _, port = resolved.rpartition(":")
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:  # ConnectionError is an OSError
            raise ConfigError(
                f"no Ray cluster {where} ({exc}); start one with `ray start --head`, or give "
                "--address HOST:PORT"
            ) from None
    ray.init(
        address=address or "auto",
        namespace=NAMESPACE,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=False,
    )


def deploy(
    cluster: ClusterConfig,
    controller_url: str,
    address: str | None,
    console: Console,
    token: ClusterToken | None = None,
    ca_file: str | None = None,
) -> int:
    """Deploy (or update) every model of ``cluster``; remove models no longer in it."""
    attached = [spec.name for spec in cluster.models if spec.url]
    if attached:  # a Ray replica runs an engine; nothing of an attached server's runs on Ray
        raise ConfigError(
            f"{', '.join(attached)}: attached servers (engine openai) are not Ray deployments; "
            "run `fleetserve worker --engine openai --url ...` for each, next to the cluster"
        )
    import ray
    from ray import serve
    from ray.experimental import internal_kv

    from fleetserve.ray.replica import FleetReplica

    _connect(address)
    controller = _Controller(controller_url, token, ca_file)
    try:  # before any replica: gateways hold the models' requests from now on
        for spec in cluster.models:
            controller.declare(spec)
    except httpx.HTTPError as exc:
        console.print(f"[red]{describe_failure(controller_url, exc)}[/red]")
        return 1
    serve.start(proxy_location="Disabled")  # the fleetserve gateway is the ingress
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    replica: Any = serve.deployment(FleetReplica)  # Serve's overloads confuse mypy here
    running = _our_apps()
    targets = []
    for spec in cluster.models:
        name, digest = app_name(spec), _digest(spec, controller_url, has_gpus)
        if name in running and _deployed_digest(name) == digest:
            console.print(f"{name}: unchanged")
            continue
        # Serve restarts every replica of an application it is given again (it versions
        # deployments itself): only changed models are given, and roll.
        targets.append(
            serve.RunTarget(
                replica.options(**deployment_options(spec, has_gpus, controller_url, ca_file)).bind(
                    spec.model_dump_json(), controller_url
                ),
                name=name,
                route_prefix=None,
            )
        )
        internal_kv._internal_kv_put(_digest_key(name), digest, namespace=NAMESPACE)
        internal_kv._internal_kv_put(_model_key(name), spec.name, namespace=NAMESPACE)
    if targets:
        serve.run_many(targets, wait_for_applications_running=False)
    wanted = {app_name(spec) for spec in cluster.models}
    for name in _our_apps():
        if name not in wanted:
            console.print(f"removing {name} (not in the cluster file any more)")
            serve.delete(name, _blocking=False)
            controller.forget(name)
    return _wait_running(wanted, max(spec.start_timeout_s for spec in cluster.models), console)


def _digest(spec: ModelSpec, controller_url: str, has_gpus: bool) -> str:
    """What a model was deployed from: the same digest means nothing to roll."""
    what = f"{__version__} {spec.model_dump_json()} {controller_url} {has_gpus}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def _digest_key(name: str) -> str:
    # Kept in Ray's own key-value store: it lives with the cluster, not on this machine.
    return f"deployed/{name}"


def _model_key(name: str) -> str:
    return f"model/{name}"  # the model an application serves (app names are slugs)


class _Controller:
    """The declarations of the models on Ray, with the controller (the cluster token's
    control plane): made at deploy, removed with the model."""

    def __init__(self, url: str, token: ClusterToken | None, ca_file: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = token.header() if token else None
        self.verify = client_tls(ca_file)

    def declare(self, spec: ModelSpec) -> None:
        declared = spec.declaration().model_dump(mode="json")
        self._call("PUT", spec.name, declared)

    def forget(self, app: str) -> None:
        """Undeclare the model of application ``app`` (best effort: a controller that is
        down forgets it at its restart anyway) and drop what was kept of it."""
        from ray.experimental import internal_kv

        model = internal_kv._internal_kv_get(_model_key(app), namespace=NAMESPACE)
        if isinstance(model, bytes):
            try:
                self._call("DELETE", model.decode())
            except httpx.HTTPError as exc:
                logger.warning("could not undeclare %s: %s", model.decode(), exc)
        for key in (_digest_key(app), _model_key(app)):
            internal_kv._internal_kv_del(key, namespace=NAMESPACE)

    def _call(self, method: str, model: str, body: Any = None) -> None:
        response = httpx.request(
            method,
            f"{self.url}/models/{quote(model, safe='/')}",
            json=body,
            headers=self.headers,
            verify=self.verify,
            timeout=10.0,
        )
        if method != "DELETE" or response.status_code != 404:
            response.raise_for_status()


def _deployed_digest(name: str) -> str | None:
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(_digest_key(name), namespace=NAMESPACE)
    return value.decode() if isinstance(value, bytes) else None


def _our_apps() -> dict[str, Any]:
    from ray import serve

    apps = serve.status().applications
    return {name: app for name, app in apps.items() if name.startswith(APP_PREFIX)}


def _wait_running(names: set[str], timeout_s: float, console: Console) -> int:
    """Report each application's state until all run; 1 if one failed or time ran out."""
    started = time.monotonic()
    last: dict[str, str] = {}
    while time.monotonic() - started < timeout_s:
        apps = _our_apps()
        for name in sorted(names):
            app = apps.get(name)
            state = _name(app.status) if app else "PENDING"
            if last.get(name) != state:
                last[name] = state
                elapsed = time.monotonic() - started
                console.print(f"{name}: {state} after {elapsed:.0f}s")
                if app is not None and state == "DEPLOY_FAILED":
                    console.print(app.message, markup=False, highlight=False)
                    return 1
        if all(state == "RUNNING" for state in last.values()) and len(last) == len(names):
            console.print("every model is running on Ray")
            return 0
        time.sleep(1.0)
    console.print(f"[red]not all models running after {time.monotonic() - started:.0f}s[/red]")
    return 1


def _name(state: Any) -> str:
    """Serve reports states as enums or as their string values, depending on the call."""
    return str(getattr(state, "value", state))


def status(
    controller_url: str,
    address: str | None,
    console: Console,
    token: ClusterToken | None = None,
    ca_file: str | None = None,
) -> int:
    """One row per model: Ray's view (replica states) next to the controller's (workers)."""
    _connect(address)
    try:
        workers = fetch_table(controller_url, token, ca_file).workers
    except httpx.HTTPError as exc:
        console.print(f"[yellow]{describe_failure(controller_url, exc)}[/yellow]")
        workers = []
    view = Table(title="fleetserve on Ray")
    for column in ("application", "status", "replicas (Ray)", "workers registered"):
        view.add_column(column, no_wrap=True)
    for name, app in sorted(_our_apps().items()):
        states: dict[str, int] = {}
        for deployment in app.deployments.values():
            for state, count in deployment.replica_states.items():
                states[_name(state)] = states.get(_name(state), 0) + count
        model = name.removeprefix(APP_PREFIX)
        registered = sum(1 for w in workers if slug(w.model_names[0]) == model)
        replicas = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items()))
        view.add_row(name, _name(app.status), replicas or "-", str(registered))
    console.print(view)
    return 0


def down(
    address: str | None,
    console: Console,
    controller_url: str,
    token: ClusterToken | None = None,
    ca_file: str | None = None,
) -> int:
    """Remove every fleetserve application; each replica drains before it stops."""
    from ray import serve

    _connect(address)
    controller = _Controller(controller_url, token, ca_file)
    for name in _our_apps():
        console.print(f"removing {name} (replicas drain first)")
        serve.delete(name)
        controller.forget(name)
    if not serve.status().applications:
        serve.shutdown()
    console.print("done")
    return 0
