"""What every fleetserve object on Kubernetes shares: names, labels, pod security, the
cluster token's Secret."""

from __future__ import annotations

import re
from typing import Any

Obj = dict[str, Any]

NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
MODEL_LABEL = "fleetserve.io/model"
LABELS = {NAME_LABEL: "fleetserve", "app.kubernetes.io/part-of": "fleetserve"}

CONTROLLER = "fleetserve-controller"
GATEWAY = "fleetserve-gateway"
MODELS_CONFIGMAP = "fleetserve-models"
TOKEN_SECRET = "fleetserve-cluster-token"
KEYS_SECRET = "fleetserve-api-keys"
HF_TOKEN_SECRET = "fleetserve-hf-token"
TOKEN_DIR = "/etc/fleetserve/cluster-token"
KEYS_DIR = "/etc/fleetserve/keys"
MODELS_DIR = "/etc/fleetserve/models"
#: The controller's pod template carries its models file's hash: applying a changed list of
#: models restarts it (soft state, whole again after one heartbeat), so it declares them.
MODELS_HASH_ANNOTATION = "fleetserve.io/models-sha256"

GATEWAY_SERVICE_PORT = 80


def meta(name: str, component: str, model: str | None = None) -> Obj:
    labels = {**LABELS, COMPONENT_LABEL: component}
    if model is not None:
        labels[MODEL_LABEL] = model
    return {"name": name, "labels": labels}


def selector(component: str, model: str | None = None) -> Obj:
    labels = {NAME_LABEL: "fleetserve", COMPONENT_LABEL: component}
    if model is not None:
        labels[MODEL_LABEL] = model
    return {"matchLabels": labels}


def pod_security(fs_group: bool = False) -> Obj:
    """The restricted Pod Security Standard: the images' user 1000, RuntimeDefault seccomp."""
    context: Obj = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000}
    if fs_group:
        context["fsGroup"] = 1000
    return {**context, "seccompProfile": {"type": "RuntimeDefault"}}


CONTAINER_SECURITY: Obj = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
#: fleetserve never calls the Kubernetes API: no service-account token, no service links.
POD_BASICS: Obj = {"automountServiceAccountToken": False, "enableServiceLinks": False}


def token() -> tuple[Obj, Obj]:
    """The cluster token Secret as a file (re-read when the Secret changes: it rotates without
    a restart; never an argument or environment variable): (volume, mount)."""
    return (
        {"name": "cluster-token", "secret": {"secretName": TOKEN_SECRET}},
        {"name": "cluster-token", "mountPath": TOKEN_DIR, "readOnly": True},
    )


def http_probe(path: str, port: str, period_s: int, **more: int) -> Obj:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period_s, **more}


def model_label(model: str) -> str:
    """The model's name as Kubernetes names and labels take it (its pods' ``fleetserve.io/model``
    label, its worker objects' names): lowercase, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", model.lower()).strip("-.")


def worker_name(model: str) -> str:
    """The name of the model's worker objects."""
    return f"fleetserve-worker-{model_label(model)}"
