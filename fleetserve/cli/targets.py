"""Which cluster-file fields each deployment target honours, and why it refuses the others.

One cluster file drives every target: `fleetserve up` on one machine, the SkyPilot
YAMLs (`fleetserve up` on each node; SkyServe for deploy/service.yaml), Kubernetes
(k8s/) and Ray (`fleetserve ray deploy`). A target that cannot do
what a field asks refuses the file, naming the field and the reason, before anything
starts: a field is never silently ignored.

Every field of the cluster file's models, gateway and controller is classified here,
for every target (tests/fleetserve/test_targets.py fails on a field that is not): a
field honoured everywhere maps to ``EVERYWHERE``, others to the targets that refuse
it and why. A field counts as given when its value differs from its default.

Checked by `fleetserve up --target local|skypilot|skyserve` (deploy/ passes its target),
`fleetserve render k8s` (the k8s column) and `fleetserve ray deploy` (the ray column).
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum

from pydantic import BaseModel

from controller.settings import ControllerSettings
from fleetserve.cli.cluster import ClusterConfig, Load, ModelSpec
from fleetserve.errors import ConfigError
from gateway.settings import GatewaySettings


class Target(StrEnum):
    LOCAL = "local"  # `fleetserve up` on one machine
    SKYPILOT = "skypilot"  # deploy/serve.yaml, cluster.yaml, worker.yaml: `up` on each node
    SKYSERVE = "skyserve"  # deploy/service.yaml: every SkyServe replica runs the whole file
    KUBERNETES = "k8s"  # `fleetserve render k8s` (k8s/)
    RAY = "ray"  # `fleetserve ray deploy` (not checked by it yet)


#: Target -> why it cannot honour the field. Empty: honoured everywhere.
Refusals = dict[Target, str]
EVERYWHERE: Refusals = {}

_SKYSERVE_SCALES = (
    "SkyServe scales whole replicas of the cluster file by requests per second "
    "(replica_policy in deploy/service.yaml), not one model"
)
_ONE_MACHINE = "`fleetserve up` runs on one machine"
_K8S_SECRET = "pods read it from a Secret (k8s/README.md), not from a path on this machine"
_K8S_TLS = (
    "terminate TLS at an Ingress or Gateway API route in front of the gateway's Service, or "
    "mount your certificate with a kustomize patch"
)
_K8S_LISTEN = (
    "pods listen on every address; the Service and NetworkPolicies decide who reaches them"
)
_K8S_ATTACHED = (
    "attached servers (engine openai) are not rendered: run `fleetserve worker --engine openai "
    "--url` where it reaches them"
)
_SKY_LISTEN = (
    "nodes listen on every address: the nodes' network and the YAML's resources.ports decide "
    "who reaches them"
)

_ADAPTERS = {
    Target.KUBERNETES: "the worker pods' manifests do not mount adapter directories or "
    "pass --max-adapters yet: run `fleetserve up` in one pod",
    Target.RAY: "`fleetserve ray deploy` does not start replicas with --max-adapters yet",
}

MODEL_FIELDS: dict[str, Refusals] = {
    "name": EVERYWHERE,
    "aliases": EVERYWHERE,
    "engine": EVERYWHERE,
    "source": EVERYWHERE,
    "tensor_parallel_size": EVERYWHERE,
    "pipeline_parallel_size": EVERYWHERE,  # k8s: every stage in one pod (TP x PP GPUs)
    "replicas": EVERYWHERE,
    "engine_args": EVERYWHERE,
    "routing_policy": EVERYWHERE,
    "autoscaling": {
        Target.LOCAL: f"{_ONE_MACHINE} with a fixed number of replicas; Ray "
        "(`fleetserve ray deploy`) and Kubernetes (KEDA, k8s/README.md) autoscale",
        Target.SKYPILOT: "a SkyPilot cluster has a fixed number of nodes; deploy/service.yaml "
        "autoscales whole replicas with SkyServe",
        Target.SKYSERVE: _SKYSERVE_SCALES,
    },
    "nodes": {
        Target.LOCAL: f"{_ONE_MACHINE}: put its stages on its GPUs (nodes: 1)",
        Target.SKYSERVE: "a SkyServe replica is one node",
        Target.KUBERNETES: "a replica spanning pods needs a LeaderWorkerSet, which is not "
        "rendered: give it one node with TP x PP GPUs (nodes: 1)",
    },
    "gpu": {
        Target.RAY: "Ray places replicas by GPU count only; label the nodes' GPUs as Ray "
        "custom resources and deploy them apart",
    },
    "start_timeout_s": EVERYWHERE,
    "sleep_after_s": EVERYWHERE,  # the worker's agent puts its engine to sleep: on every target
    # k8s: a KEDA ScaledObject idling at zero replicas, woken by a held request's demand, with
    # idle_timeout_s its cooldownPeriod; Ray: autoscaling from 0 to its replicas on the
    # gateways' demand, idle_timeout_s Serve's downscale_to_zero_delay_s (fleetserve/ray/deploy.py)
    "load": EVERYWHERE,  # given only as on_demand (_given)
    "idle_timeout_s": EVERYWHERE,
    "fallbacks": EVERYWHERE,
    "url": {
        Target.KUBERNETES: _K8S_ATTACHED,
        Target.RAY: "Ray replicas are interchangeable: an attached server per url is not; run "
        "`fleetserve up` or `fleetserve worker --engine openai --url` beside them",
    },
    "upstream_model": {Target.KUBERNETES: _K8S_ATTACHED},
    "upstream_key": {Target.KUBERNETES: _K8S_ATTACHED},
    "endpoints": EVERYWHERE,
    "capacity": EVERYWHERE,
    # LoRA adapters: directories on the workers' disk, loaded at run time by the agents
    "adapters": _ADAPTERS,
    "max_adapters_per_replica": _ADAPTERS,
    "max_lora_rank": EVERYWHERE,  # read only with adapters, refused above where they are
}

GATEWAY_FIELDS: dict[str, Refusals] = {
    "host": {
        Target.KUBERNETES: _K8S_LISTEN,
        Target.SKYPILOT: _SKY_LISTEN,
        Target.SKYSERVE: _SKY_LISTEN,
    },
    "port": EVERYWHERE,
    "controller_url": {Target.KUBERNETES: "gateways reach the controller's Service"},
    "max_body_bytes": EVERYWHERE,
    "processes": {Target.KUBERNETES: "scale gateway pods instead (their autoscaler)"},
    "access_log": EVERYWHERE,
    "max_tokens_limit": EVERYWHERE,
    "request_timeout_s": EVERYWHERE,
    "drain_timeout_s": EVERYWHERE,  # k8s: at least the request timeout, and the pod's grace
    "keys_file": EVERYWHERE,  # k8s: its entries (read where it renders) go into the keys Secret
    "keys": EVERYWHERE,
    "cluster_token_file": {Target.KUBERNETES: _K8S_SECRET},
    "ca_file": {Target.KUBERNETES: "the controller's Service speaks plain HTTP in the cluster"},
    "tls_cert_file": {Target.KUBERNETES: _K8S_TLS},
    "tls_key_file": {Target.KUBERNETES: _K8S_TLS},
    "header_timeout_s": EVERYWHERE,
    "max_header_bytes": EVERYWHERE,
    "max_connections": EVERYWHERE,
    "max_audio_body_bytes": EVERYWHERE,
    "secrets_dir": {Target.KUBERNETES: _K8S_SECRET},
    "routing_policy": EVERYWHERE,
    "hold_timeout_s": EVERYWHERE,
    "stream_idle_timeout_s": EVERYWHERE,
    "max_resumes": EVERYWHERE,
    "retry_budget_ratio": EVERYWHERE,
    "retry_budget_min_per_s": EVERYWHERE,
    "circuit_failures": EVERYWHERE,
    "circuit_open_s": EVERYWHERE,
}

CONTROLLER_FIELDS: dict[str, Refusals] = {
    "host": {
        Target.KUBERNETES: _K8S_LISTEN,
        Target.SKYPILOT: _SKY_LISTEN,
        Target.SKYSERVE: _SKY_LISTEN,
    },
    "port": EVERYWHERE,
    "heartbeat_interval_s": EVERYWHERE,
    "expiry_after_s": EVERYWHERE,
    "cluster_token_file": {Target.KUBERNETES: _K8S_SECRET},
    "insecure": {Target.KUBERNETES: "the controller always reads the cluster token's Secret"},
    "tls_cert_file": {Target.KUBERNETES: _K8S_TLS},
    "tls_key_file": {Target.KUBERNETES: _K8S_TLS},
    "header_timeout_s": EVERYWHERE,
    "max_header_bytes": EVERYWHERE,
    "max_connections": EVERYWHERE,
    "models_file": {
        target: "the cluster file's models are the declared ones (`fleetserve up` writes "
        "the controller's models_file from them)"
        for target in Target
    },
}

#: Each part of the cluster file and its table.
TABLES: dict[type[BaseModel], dict[str, Refusals]] = {
    ModelSpec: MODEL_FIELDS,
    GatewaySettings: GATEWAY_FIELDS,
    ControllerSettings: CONTROLLER_FIELDS,
}


def _given(part: BaseModel) -> Iterator[str]:
    """The fields of ``part`` whose value is not the default (a model's load and idle timeout:
    given when it is on demand; the file fills in every model's)."""
    for name, field in type(part).model_fields.items():
        if isinstance(part, ModelSpec) and name in ("load", "idle_timeout_s"):
            if part.load is Load.ON_DEMAND:
                yield name
        elif getattr(part, name) != field.get_default(call_default_factory=True):
            yield name


def _refused(part: BaseModel, where: str, target: Target) -> Iterator[str]:
    table = TABLES[type(part)]
    for name in _given(part):
        if name not in table:  # a field added without a decision: refuse rather than ignore
            yield f"{where}{name}: not classified for any target yet (fleetserve/cli/targets.py)"
        elif target in table[name]:
            yield f"{where}{name}: {table[name][target]}"


def refusals(cluster: ClusterConfig, target: Target) -> list[str]:
    """One line per given field ``target`` cannot honour: ``models[1].autoscaling: why``."""
    found = [*_refused(cluster.controller, "controller.", target)]
    found += _refused(cluster.gateway, "gateway.", target)
    for i, spec in enumerate(cluster.models):
        found += _refused(spec, f"models[{i}].", target)
    return found


def check(cluster: ClusterConfig, target: Target, origin: str = "the cluster file") -> None:
    """ConfigError naming every field ``target`` cannot honour; nothing when it honours all."""
    found = refusals(cluster, target)
    if found:
        lines = "\n".join(f"  {line}" for line in found)
        raise ConfigError(f"{origin} asks for what {target.value} cannot do:\n{lines}")
