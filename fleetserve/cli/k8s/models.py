"""One model's workers as Kubernetes objects: Deployment, PodDisruptionBudget, and KEDA's
ScaledObject where the model autoscales or loads on demand. Built from the model's own entry
of the cluster file alone."""

from __future__ import annotations

import math

from fleetserve import constants
from fleetserve.cli.args import settings_argv
from fleetserve.cli.cluster import Load, ModelSpec
from fleetserve.cli.k8s.common import (
    CONTAINER_SECURITY,
    CONTROLLER,
    HF_TOKEN_SECRET,
    POD_BASICS,
    TOKEN_DIR,
    Obj,
    http_probe,
    meta,
    model_label,
    pod_security,
    selector,
    token,
    worker_name,
)
from fleetserve.cli.up import worker_settings
from workers.engines import Engine
from workers.hub import is_hub_id
from workers.settings import Device

# A worker pod's ports: the engine behind the agent's relay, the agent's status server
# (probes, metrics), its KV-event server (engines that publish KV-cache events).
WORKER_PORT, STATUS_PORT, KV_EVENTS_PORT = 8000, 8081, 8082

# Requests and limits per replica, for the scheduler; patch them in an overlay for your
# nodes. A GPU replica: 4 cores and 32 GiB (limit 64) per GPU, what vLLM's tokenizers,
# scheduler and pinned host buffers take beside a card. vLLM's CPU build: 2 cores and 4
# GiB (limit 6) per rank, as the tiny demo model used here. The fake engine: a token stream.
PER_GPU = {"cpu": 4, "memory_gib": 32, "limit_gib": 64}
PER_CPU_RANK = {"cpu": 2, "memory_gib": 4, "limit_gib": 6}
FAKE_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
#: NCCL and PyTorch exchange tensors through /dev/shm (the runtime's default 64 MiB is far
#: too small): this much per GPU, at least one GPU's worth.
SHM_GIB_PER_GPU = 8


#: The root filesystem is read-only: caches go to /cache, weights to /models.
CACHE_ENV = [
    {"name": "HOME", "value": "/cache/home"},
    {"name": "XDG_CACHE_HOME", "value": "/cache"},
    {"name": "FLEETSERVE_HOME", "value": "/cache/fleetserve"},
    {"name": "HF_HOME", "value": "/models/huggingface"},
]


def _resources(engine: type[Engine], gpus: int, ranks: int) -> Obj:
    if gpus:
        return {
            "requests": {
                "cpu": str(PER_GPU["cpu"] * gpus),
                "memory": f"{PER_GPU['memory_gib'] * gpus}Gi",
                "nvidia.com/gpu": gpus,
            },
            "limits": {"memory": f"{PER_GPU['limit_gib'] * gpus}Gi", "nvidia.com/gpu": gpus},
        }
    if engine.name == "fake":
        return FAKE_RESOURCES
    return {
        "requests": {
            "cpu": str(PER_CPU_RANK["cpu"] * ranks),
            "memory": f"{PER_CPU_RANK['memory_gib'] * ranks}Gi",
        },
        "limits": {"memory": f"{PER_CPU_RANK['limit_gib'] * ranks}Gi"},
    }


def _gpu_affinity(spec: ModelSpec) -> Obj | None:
    """``gpu:`` as node affinity on NVIDIA GPU feature discovery's labels (one term: its
    expressions are ANDed); the memory label is in MiB and Gt is strict."""
    if spec.gpu is None:
        return None
    expressions = []
    if spec.gpu.products:
        expressions.append(
            {"key": "nvidia.com/gpu.product", "operator": "In", "values": spec.gpu.products}
        )
    if spec.gpu.min_memory_gib:
        mib = round(spec.gpu.min_memory_gib * 1024)
        expressions.append(
            {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": [str(mib - 1)]}
        )
    if not expressions:
        return None
    terms = [{"matchExpressions": expressions}]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
        }
    }


def _pull(spec: ModelSpec, image: str) -> Obj:
    """The model's weights as a step of their own: `fleetserve model pull` before the worker
    starts (resumable after a restart; a gated model without a token, or a wrong name, fails
    here at once with the fix in its log). Only this container gets HF_TOKEN, from the
    optional Secret fleetserve-hf-token; the worker then only reads (HF_HUB_OFFLINE)."""
    hf_token = {"name": HF_TOKEN_SECRET, "key": "token", "optional": True}
    return {
        "name": "pull",
        "image": image,
        "args": ["model", "pull", spec.source, "--progress-every-s", "30"],
        "env": [*CACHE_ENV, {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": hf_token}}],
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "models", "mountPath": "/models"},
        ],
    }


def worker_objects(spec: ModelSpec, controller_url: str, device: Device, image: str) -> list[Obj]:
    """One model's workers: a Deployment of its replicas (engine + agent in one container),
    its PodDisruptionBudget, and a ScaledObject where KEDA decides the replicas."""
    name, label = worker_name(spec.name), model_label(spec.name)
    engine = Engine.named(spec.engine)
    ranks = spec.tensor_parallel_size * spec.pipeline_parallel_size
    on_gpus = engine.uses_accelerator and device is not Device.CPU
    gpus = ranks if on_gpus else 0
    settings = worker_settings(
        spec,
        host="0.0.0.0",
        advertise_host="$(POD_IP)",  # Kubernetes fills it in from the env below
        device=Device.CPU if engine.uses_accelerator and not on_gpus else None,
    ).model_copy(
        update={
            "port": WORKER_PORT,
            "status_port": STATUS_PORT,
            "kv_events_port": KV_EVENTS_PORT if engine.publishes_kv_events else 0,
            "controller_url": controller_url,
            "cluster_token_file": f"{TOKEN_DIR}/token",
        }
    )
    args = ["worker", *settings_argv(settings, skip=("engine_args",))]
    if settings.engine_args:
        args += ["--", *settings.engine_args]
    ports = [
        {"name": "openai", "containerPort": WORKER_PORT},
        {"name": "status", "containerPort": STATUS_PORT},
    ]
    if engine.publishes_kv_events:
        ports.append({"name": "kv-events", "containerPort": KV_EVENTS_PORT})
    token_volume, token_mount = token()
    container = {
        "name": "worker",
        "image": image,
        "args": args,
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            *CACHE_ENV,
            {"name": "HF_HUB_OFFLINE", "value": "1"},  # pulled before (the `pull` step)
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        ],
        "ports": ports,
        # Ready only while the engine is loaded, registered and not draining; the agent
        # shares a busy machine with the engine, so 5 s to answer (the default is 1 s).
        "readinessProbe": http_probe("/health", "status", 5, timeoutSeconds=5, failureThreshold=1),
        # The agent answers while a big model loads for many minutes (no startupProbe), and
        # restarts a dead engine itself.
        "livenessProbe": http_probe("/live", "status", 10, timeoutSeconds=5, failureThreshold=6),
        "resources": _resources(engine, gpus, ranks),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "models", "mountPath": "/models"},
            token_mount,
        ],
    }
    shm_gib = SHM_GIB_PER_GPU * max(gpus, 1)
    pod: Obj = {
        **POD_BASICS,
        "terminationGracePeriodSeconds": constants.K8S_WORKER_GRACE_S,
        "securityContext": pod_security(fs_group=True),
    }
    affinity = _gpu_affinity(spec)
    if affinity and gpus:
        pod["affinity"] = affinity
    if gpus:  # GPU node pools are commonly tainted so that only GPU pods land there
        pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    if engine.loads_hub_models and is_hub_id(spec.source):
        pod["initContainers"] = [_pull(spec, image)]
    pod["containers"] = [container]
    pod["volumes"] = [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib}Gi"}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        # weights: an overlay puts a shared (ReadWriteMany) claim here (k8s/overlays/gpu)
        {"name": "models", "emptyDir": {}},
        token_volume,
    ]
    scaled = scaled_object(spec, controller_url)
    template_meta = meta(name, "worker", label)
    del template_meta["name"]
    deployment_spec: Obj = {}
    if scaled is None:  # else KEDA owns the count (kubectl apply would reset it)
        deployment_spec["replicas"] = spec.replicas
    deployment_spec |= {
        # a rollout is not declared failed while the engine is within its start-up budget
        "progressDeadlineSeconds": math.ceil(spec.start_timeout_s) + constants.K8S_POD_START_S,
        # One pod at a time and no surge (a surge pod would need GPUs that are usually all
        # taken): the new pod is ready once its engine serves, the old one drains on SIGTERM.
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        },
        "selector": selector("worker", label),
        "template": {"metadata": template_meta, "spec": pod},
    }
    objs = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(name, "worker", label),
            "spec": deployment_spec,
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta(name, "worker", label),
            "spec": {"maxUnavailable": 1, "selector": selector("worker", label)},
        },
    ]
    return objs if scaled is None else [*objs, scaled]


def scaled_object(spec: ModelSpec, controller_url: str) -> Obj | None:
    """KEDA's ScaledObject for a model with ``autoscaling:`` or ``load: on_demand``.

    Replicas follow the controller's sum of running + waiting requests over the model's
    workers (``GET /models/NAME/load``, ``ongoing``), per replica. An on-demand model idles at
    zero: a request a gateway holds for it counts in ``ongoing`` (``held``), which activates
    it (min replicas, or all its replicas without autoscaling); ``idle_timeout_s`` after the
    last activity (KEDA's cooldownPeriod) it is back at zero.
    """
    scaling = spec.autoscaling
    on_demand = spec.load is Load.ON_DEMAND
    if scaling is None and not on_demand:
        return None
    low, high = (scaling.min_replicas, scaling.max_replicas) if scaling else (spec.replicas,) * 2
    target = scaling.target_ongoing_requests if scaling else constants.TARGET_ONGOING_REQUESTS
    deployment = worker_name(spec.name)
    so: Obj = {"scaleTargetRef": {"name": deployment}}
    if on_demand:
        assert spec.idle_timeout_s is not None  # the file fills it in
        so |= {"idleReplicaCount": 0, "cooldownPeriod": math.ceil(spec.idle_timeout_s)}
    so |= {
        "minReplicaCount": low,
        "maxReplicaCount": high,
        "pollingInterval": constants.KEDA_POLLING_INTERVAL_S,
    }
    if scaling is not None:  # the HPA's stabilization windows
        so["advanced"] = {
            "horizontalPodAutoscalerConfig": {
                "behavior": {
                    "scaleUp": {"stabilizationWindowSeconds": math.ceil(scaling.upscale_delay_s)},
                    "scaleDown": {
                        "stabilizationWindowSeconds": math.ceil(scaling.downscale_delay_s)
                    },
                }
            }
        }
    so["triggers"] = [
        {
            "type": "metrics-api",
            "metricType": "AverageValue",  # the model's total over its replicas: per replica
            "metadata": {
                "url": f"{controller_url}/models/{spec.name}/load",
                "format": "json",
                "valueLocation": "ongoing",  # controller.protocol.ModelLoad
                "targetValue": f"{target:g}",
                "authMode": "bearer",
            },
            "authenticationRef": {"name": CONTROLLER},  # keda_objects(): the cluster token
        }
    ]
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": meta(deployment, "worker", model_label(spec.name)),
        "spec": so,
    }
