"""The controller, the gateway and the network policies as Kubernetes objects."""

from __future__ import annotations

import base64
import hashlib
import math
from pathlib import Path

import yaml

from fleetserve import constants
from fleetserve.cli.args import settings_argv
from fleetserve.cli.cluster import ClusterConfig, Load
from fleetserve.cli.k8s.common import (
    CONTAINER_SECURITY,
    CONTROLLER,
    GATEWAY,
    GATEWAY_SERVICE_PORT,
    KEYS_DIR,
    KEYS_SECRET,
    LABELS,
    MODELS_CONFIGMAP,
    MODELS_DIR,
    MODELS_HASH_ANNOTATION,
    NAME_LABEL,
    POD_BASICS,
    TOKEN_DIR,
    TOKEN_SECRET,
    Obj,
    http_probe,
    meta,
    pod_security,
    selector,
    token,
)
from gateway.settings import KeysFile, load_keys_file

# -- controller --------------------------------------------------------------------------


def declared_models(cluster: ClusterConfig) -> str:
    """The controller's models file: each model's names, policy, fallbacks and load (on
    demand, or autoscaled from zero: declared with no replica wanted, so that a gateway
    holding a request for it tells the controller, whose load KEDA reads)."""
    models = []
    for spec in cluster.models:
        entry = spec.model_dump(
            mode="json", include={"name", "aliases", "routing_policy", "fallbacks"}
        )
        if spec.wanted_at_least() == 0:
            entry["load"] = Load.ON_DEMAND.value
        models.append({key: value for key, value in entry.items() if value not in (None, [])})
    return yaml.safe_dump({"models": models}, sort_keys=False)


def controller_objects(cluster: ClusterConfig, image: str) -> list[Obj]:
    """The registry: one replica (a second would hold a second registry), Recreate (two at
    once would split the workers between them for a heartbeat), not on the request path."""
    models = declared_models(cluster)
    settings = cluster.controller.model_copy(
        update={
            "host": "0.0.0.0",
            "cluster_token_file": f"{TOKEN_DIR}/token",
            "models_file": f"{MODELS_DIR}/models.yaml",
        }
    )
    token_volume, token_mount = token()
    container = {
        "name": "controller",
        "image": image,
        "args": ["controller", *settings_argv(settings)],
        "ports": [{"name": "http", "containerPort": settings.port}],
        "readinessProbe": http_probe("/health", "http", 5),
        "livenessProbe": http_probe("/health", "http", 10, failureThreshold=3),
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        },
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            token_mount,
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
        ],
    }
    pod = {
        **POD_BASICS,
        "terminationGracePeriodSeconds": 10,
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": [token_volume, {"name": "models", "configMap": {"name": MODELS_CONFIGMAP}}],
    }
    digest = hashlib.sha256(models.encode()).hexdigest()
    template_meta = meta(CONTROLLER, "controller")
    del template_meta["name"]
    template_meta["annotations"] = {MODELS_HASH_ANNOTATION: digest}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(MODELS_CONFIGMAP, "controller"),
            "data": {"models.yaml": models},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(CONTROLLER, "controller"),
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": selector("controller"),
                "template": {"metadata": template_meta, "spec": pod},
            },
        },
        _service(CONTROLLER, "controller", settings.port),
    ]


def _service(name: str, component: str, port: int) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name, component),
        "spec": {
            "selector": selector(component)["matchLabels"],
            "ports": [{"name": "http", "port": port, "targetPort": "http"}],
        },
    }


# -- gateway -----------------------------------------------------------------------------


def _keys(cluster: ClusterConfig) -> KeysFile | None:
    """The file's API keys (inline, or its keys_file read here), for the keys Secret."""
    g = cluster.gateway
    if g.keys:
        return KeysFile(keys=g.keys)
    if g.keys_file:
        return KeysFile(keys=load_keys_file(Path(g.keys_file)))
    return None


def gateway_objects(cluster: ClusterConfig, controller_url: str, image: str) -> list[Obj]:
    """The OpenAI endpoint: stateless, scaled by its HorizontalPodAutoscaler (so the
    Deployment sets no replicas), one process per pod (each /metrics scrape sees a whole
    process). A terminating pod lets every request run its course: its drain is at least
    the request timeout, its grace period longer."""
    g = cluster.gateway
    request_timeout_s = g.request_timeout_s or constants.K8S_REQUEST_TIMEOUT_S
    settings = g.model_copy(
        update={
            "host": "0.0.0.0",
            "controller_url": controller_url,
            "keys": [],
            "keys_file": f"{KEYS_DIR}/keys.yaml",
            "request_timeout_s": request_timeout_s,
            "drain_timeout_s": max(g.drain_timeout_s, request_timeout_s),
            "cluster_token_file": f"{TOKEN_DIR}/token",
        }
    )
    grace_s = (
        constants.K8S_GATEWAY_PRESTOP_S
        + math.ceil(settings.drain_timeout_s)
        + constants.K8S_GRACE_SPARE_S
    )
    token_volume, token_mount = token()
    container = {
        "name": "gateway",
        "image": image,
        "args": ["gateway", *settings_argv(settings)],
        "ports": [{"name": "http", "containerPort": settings.port}],
        "lifecycle": {"preStop": {"sleep": {"seconds": constants.K8S_GATEWAY_PRESTOP_S}}},
        # ready once it has the controller's routing table (before, it answers 503)
        "readinessProbe": http_probe("/ready", "http", 5, timeoutSeconds=5),
        "livenessProbe": http_probe("/health", "http", 10, timeoutSeconds=5, failureThreshold=3),
        "resources": {"requests": {"cpu": "1", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "api-keys", "mountPath": KEYS_DIR, "readOnly": True},
            token_mount,
        ],
    }
    template_meta = meta(GATEWAY, "gateway")
    del template_meta["name"]
    objs: list[Obj] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(GATEWAY, "gateway"),
            "spec": {
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
                },
                "selector": selector("gateway"),
                "template": {
                    "metadata": template_meta,
                    "spec": {
                        **POD_BASICS,
                        "terminationGracePeriodSeconds": grace_s,
                        "securityContext": pod_security(),
                        "containers": [container],
                        # Hashes of the API keys, re-read when the Secret changes (keys come
                        # and go without a restart). Not optional: a gateway without its keys
                        # would be open to anyone.
                        "volumes": [
                            {"name": "api-keys", "secret": {"secretName": KEYS_SECRET}},
                            token_volume,
                        ],
                    },
                },
            },
        },
        _service(GATEWAY, "gateway", GATEWAY_SERVICE_PORT),
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": meta(GATEWAY, "gateway"),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY},
                "minReplicas": 2,
                "maxReplicas": 10,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 70},
                        },
                    }
                ],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta(GATEWAY, "gateway"),
            "spec": {"minAvailable": 1, "selector": selector("gateway")},
        },
    ]
    keys = _keys(cluster)
    if keys is not None:
        text = yaml.safe_dump(keys.model_dump(mode="json", exclude_defaults=True))
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": meta(KEYS_SECRET, "gateway"),
                "type": "Opaque",
                "data": {"keys.yaml": base64.b64encode(text.encode()).decode()},
            }
        )
    return objs


# -- network -----------------------------------------------------------------------------


def _from_prometheus() -> Obj:
    """Prometheus pods as the operator labels them, in any namespace."""
    return {"namespaceSelector": {}, "podSelector": {"matchLabels": {NAME_LABEL: "prometheus"}}}


def _policy(name: str, component: str, rules: list[Obj]) -> Obj:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": dict(LABELS)},
        "spec": {
            "podSelector": selector(component),
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }


def _ports(*names: str) -> list[Obj]:
    return [{"port": name, "protocol": "TCP"} for name in names]


def network_policies() -> list[Obj]:
    """Only gateways reach the engines (and their KV events); only gateways and workers the
    controller; Prometheus the metrics ports. Kubelet probes come from the node, which common
    CNIs do not filter."""
    gateway = {"podSelector": selector("gateway")}
    worker = {"podSelector": selector("worker")}
    return [
        _policy(
            "fleetserve-worker",
            "worker",
            [
                {"from": [gateway], "ports": _ports("openai", "kv-events")},
                {"from": [_from_prometheus()], "ports": _ports("status")},
            ],
        ),
        _policy(
            "fleetserve-controller",
            "controller",
            [{"from": [gateway, worker, _from_prometheus()], "ports": _ports("http")}],
        ),
    ]


def keda_objects() -> list[Obj]:
    """What KEDA (keda.sh, installed in the cluster) needs to read the controller: the
    cluster token as a bearer token, and a way through the controller's NetworkPolicy for its
    operator (its own namespace, labelled as its Helm chart labels it; policies add up)."""
    keda = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {NAME_LABEL: "keda-operator"}},
    }
    return [
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": CONTROLLER, "labels": dict(LABELS)},
            "spec": {
                "secretTargetRef": [{"parameter": "token", "name": TOKEN_SECRET, "key": "token"}]
            },
        },
        _policy(
            "fleetserve-controller-keda",
            "controller",
            [{"from": [keda], "ports": _ports("http")}],
        ),
    ]
