"""Kubernetes objects from a cluster file (`fleetserve render k8s`).

One cluster file gives every object a fleetserve cluster needs: per model a worker
Deployment, its PodDisruptionBudget and, where the model autoscales or loads on demand, a
KEDA ScaledObject; the controller (its Deployment, Service and the ConfigMap of the file's
models, which it declares); the gateway (Deployment with the file's gateway settings,
Service, HorizontalPodAutoscaler, PodDisruptionBudget, the keys Secret where the file gives
keys); NetworkPolicies. Plain dicts (``render``), written as YAML (``dump``;
fleetserve/cli/render.py is the command).

A field Kubernetes cannot honour is refused (fleetserve/cli/targets.py) before anything is
built. What stays outside: the namespace, image names (kustomize ``images:``), the cluster
token's Secret (and the keys' where the file has none: the operator makes them), a shared
volume for weights, and the Prometheus operator's objects (k8s/monitoring): a kustomize
overlay adds them (k8s/overlays/).

Each model's worker is built from its own entry alone, so changing a model's
tensor-parallel size, replicas or engine arguments changes its worker objects and nothing
else. The controller is told which models should exist and which are on demand, not how
many replicas each has: the Deployment (or KEDA) owns that count on Kubernetes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from fleetserve.cli.cluster import ClusterConfig
from fleetserve.cli.k8s.common import CONTROLLER, Obj, model_label
from fleetserve.cli.k8s.models import worker_objects
from fleetserve.cli.k8s.services import (
    controller_objects,
    gateway_objects,
    keda_objects,
    network_policies,
)
from fleetserve.cli.targets import Target, check
from fleetserve.errors import ConfigError
from workers.settings import Device


class _Dumper(yaml.SafeDumper):
    """Every object written out in full (no YAML anchors for dicts used twice)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    """A file in a ConfigMap or Secret as a literal block (``|``), as it reads on disk."""
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _text)


def dump(objs: list[Obj]) -> str:
    """Objects as one multi-document YAML stream."""
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def _check_names(cluster: ClusterConfig) -> None:
    """ConfigError for a model Kubernetes cannot name apart from another, or at all."""
    seen: dict[str, str] = {}
    for spec in cluster.models:
        label = model_label(spec.name)
        if not label or len(label) > 63:  # a label value's limit
            raise ConfigError(
                f"model {spec.name!r}: on Kubernetes its name becomes a label of its pods "
                f"({label!r}), 1 to 63 letters, digits, '-' or '.': rename it (the old name "
                "can stay one of its aliases)"
            )
        if label in seen:
            raise ConfigError(
                f"models {seen[label]!r} and {spec.name!r} are both {label!r} as Kubernetes "
                "names them (lowercase, '-' for other characters): rename one"
            )
        seen[label] = spec.name


@dataclass(frozen=True)
class Images:
    """Image names in the objects: placeholders by default, which kustomize's ``images:``
    replaces (k8s/overlays/), or the ones given."""

    service: str = "fleetserve"  # controller and gateway (the Dockerfile's slim target)
    engine: str = "fleetserve-engine"  # workers (its cpu or cuda target)


def render(
    cluster: ClusterConfig,
    device: Device = Device.CUDA,
    images: Images = Images(),
    origin: str = "the cluster file",
) -> dict[str, list[Obj]]:
    """Every object for ``cluster``, by the file it goes to (``workers/NAME.yaml`` per model).

    ConfigError naming every field Kubernetes cannot honour, before anything is built.
    ``device``: where engines that use accelerators run (cuda: NVIDIA GPUs requested per
    replica; cpu: vLLM's CPU build).
    """
    check(cluster, Target.KUBERNETES, origin)
    _check_names(cluster)
    controller_url = f"http://{CONTROLLER}:{cluster.controller.port}"
    files: dict[str, list[Obj]] = {
        "controller.yaml": controller_objects(cluster, images.service),
        "gateway.yaml": gateway_objects(cluster, controller_url, images.service),
        "networkpolicy.yaml": network_policies(),
    }
    scaled = False
    for spec in cluster.models:
        objs = worker_objects(spec, controller_url, device, images.engine)
        scaled |= any(obj["kind"] == "ScaledObject" for obj in objs)
        files[f"workers/{model_label(spec.name)}.yaml"] = objs
    if scaled:
        files["autoscaling.yaml"] = keda_objects()
    return files
