"""`fleetserve ray deploy|status|down`: every model's replicas as Ray Serve deployments.

One Serve application per model (``fleetserve-<model>``), one replica per
worker (replica.py). Ray places replicas on nodes with the GPUs
they need, replaces those whose worker died, scales them between the model's
``autoscaling`` bounds (autoscaling.py decides), and on a new
deploy of a changed model replaces its replicas a few at a time, each
draining before it stops. Serve's HTTP proxy is not started: the fleetserve
gateway is the way in and talks to the engines directly.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from fleetserve import __version__, constants
from fleetserve.auth import ClusterToken
from fleetserve.cli.cluster import ClusterConfig, Load, ModelSpec
from fleetserve.cli.status import describe_failure, fetch_table
from fleetserve.config import slug
from fleetserve.errors import ConfigError
from workers.engines import Engine

logger = logging.getLogger(__name__)

APP_PREFIX = "fleetserve-"
NAMESPACE = "fleetserve"
_POLICY = "fleetserve.ray.autoscaling:serve_policy"


def app_name(spec: ModelSpec) -> str:
    return APP_PREFIX + slug(spec.name)


def deployment_options(spec: ModelSpec, cluster_has_gpus: bool) -> dict[str, Any]:
    """Serve deployment options for one model: resources, health checks, replicas."""
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
    scaling = spec.autoscaling
    if scaling is None:
        options["num_replicas"] = spec.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
            # Deprecated in Serve for the env var set above, but still what it checks
            # look_back_period_s against.
            "metrics_interval_s": constants.RAY_METRICS_PUSH_INTERVAL_S,
            "policy": {"policy_function": _POLICY},
        }
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
    cluster: ClusterConfig, controller_url: str, address: str | None, console: Console
) -> int:
    """Deploy (or update) every model of ``cluster``; remove models no longer in it."""
    attached = [spec.name for spec in cluster.models if spec.url]
    if attached:  # a Ray replica runs an engine; nothing of an attached server's runs on Ray
        raise ConfigError(
            f"{', '.join(attached)}: attached servers (engine openai) are not Ray deployments; "
            "run `fleetserve worker --engine openai --url ...` for each, next to the cluster"
        )
    on_demand = [spec.name for spec in cluster.models if spec.load is Load.ON_DEMAND]
    if on_demand:  # (Ray Serve's min_replicas 0 with the gateways' demand: not built yet)
        raise ConfigError(
            f"{', '.join(on_demand)}: load on_demand runs under `fleetserve up` only; on Ray, "
            "use autoscaling's min_replicas/max_replicas"
        )
    import ray
    from ray import serve
    from ray.experimental import internal_kv

    from fleetserve.ray.replica import FleetReplica

    _connect(address)
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
                replica.options(**deployment_options(spec, has_gpus)).bind(
                    spec.model_dump_json(), controller_url
                ),
                name=name,
                route_prefix=None,
            )
        )
        internal_kv._internal_kv_put(_digest_key(name), digest, namespace=NAMESPACE)
    if targets:
        serve.run_many(targets, wait_for_applications_running=False)
    wanted = {app_name(spec) for spec in cluster.models}
    for name in _our_apps():
        if name not in wanted:
            console.print(f"removing {name} (not in the cluster file any more)")
            serve.delete(name, _blocking=False)
            internal_kv._internal_kv_del(_digest_key(name), namespace=NAMESPACE)
    return _wait_running(wanted, max(spec.start_timeout_s for spec in cluster.models), console)


def _digest(spec: ModelSpec, controller_url: str, has_gpus: bool) -> str:
    """What a model was deployed from: the same digest means nothing to roll."""
    what = f"{__version__} {spec.model_dump_json()} {controller_url} {has_gpus}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def _digest_key(name: str) -> str:
    # Kept in Ray's own key-value store: it lives with the cluster, not on this machine.
    return f"deployed/{name}"


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


def down(address: str | None, console: Console) -> int:
    """Remove every fleetserve application; each replica drains before it stops."""
    from ray import serve
    from ray.experimental import internal_kv

    _connect(address)
    for name in _our_apps():
        console.print(f"removing {name} (replicas drain first)")
        serve.delete(name)
        internal_kv._internal_kv_del(_digest_key(name), namespace=NAMESPACE)
    if not serve.status().applications:
        serve.shutdown()
    console.print("done")
    return 0
