"""k8s/overlays rendered by `kubectl kustomize`, validated and read as an operator would.

Each overlay lists the objects `fleetserve render k8s` made from its cluster.yaml
(rendered/; test_render.py checks they are current). Every object is validated with
kubernetes-validate (strict: unknown fields are errors) against the newest Kubernetes it
knows; the Prometheus operator's CRDs, which it cannot know, against the strict schemas
in monitor_schemas.py. Then the properties a rollout depends on: the cluster file and
the worker Deployments agree, GPUs equal the tensor-parallel size, probes hit the agent,
the grace period outlasts the drain, only gateways reach the engines, pods run non-root
and read-only, and every command line parses with fleetserve's own CLI.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import referencing
import yaml

from controller.settings import ControllerSettings
from fleetserve import constants
from fleetserve.cli import build_parser
from fleetserve.cli.args import settings_from
from fleetserve.cli.cluster import ClusterConfig, load_cluster_file
from gateway.settings import GatewaySettings, KeysFile
from tests.k8s.crd_schemas import validate_custom
from tests.k8s.monitor_schemas import SCHEMAS
from tests.tools import require_tool
from workers.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
# overlay -> whether its engines run on NVIDIA GPUs
OVERLAYS = {"cpu-demo": False, "gpu": True}
POD_IP = "10.0.0.7"  # stands for $(POD_IP), which Kubernetes fills in

Obj = dict[str, Any]


@functools.cache
def _render(overlay: str) -> str:
    result = subprocess.run(
        [require_tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay}:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[Obj]:
    return [obj for obj in yaml.safe_load_all(_render(overlay)) if obj]


def overlay_cluster(overlay: str) -> ClusterConfig:
    """The cluster file the overlay's objects were rendered from."""
    return load_cluster_file(ROOT / "k8s" / "overlays" / overlay / "cluster.yaml")


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objs if obj["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [obj for obj in of_kind(objs, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def component(objs: list[Obj], name: str) -> list[Obj]:
    return [
        d
        for d in of_kind(objs, "Deployment")
        if pod_labels(d).get("app.kubernetes.io/component") == name
    ]


def pod_labels(deployment: Obj) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def pod_spec(deployment: Obj) -> Obj:
    spec: Obj = deployment["spec"]["template"]["spec"]
    return spec


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Kubernetes' LabelSelector semantics (matchLabels and matchExpressions, ANDed)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def container_settings(container: Obj) -> Any:
    """The container's command line parsed by `fleetserve`'s own CLI into its settings."""
    argv = [arg.replace("$(POD_IP)", POD_IP) for arg in container["args"]]
    engine_args: list[str] = []
    if "--" in argv:
        argv, engine_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = build_parser().parse_args(argv)
    model = {"worker": WorkerSettings, "gateway": GatewaySettings}.get(
        args.command, ControllerSettings
    )
    extra = {"engine_args": engine_args} if args.command == "worker" else {}
    return settings_from(model, args, **extra)


def named_port(pod: Obj, name: str) -> int:
    for container in pod["containers"]:
        for port in container.get("ports", []):
            if port.get("name") == name:
                value: int = port["containerPort"]
                return value
    raise AssertionError(f"no container port named {name!r}")


def split_flags(flags: list[str]) -> list[str]:
    """``--a=1 --b`` and ``--a 1 --b`` read the same."""
    return [part for flag in flags for part in (flag.split("=", 1) if "=" in flag else [flag])]


# -- validity --------------------------------------------------------------------------


@functools.cache
def _monitor_registry() -> referencing.Registry[Any]:
    version = kubernetes_validate.utils.latest_version()
    path = files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json"
    )
    definitions = referencing.Resource.from_contents(json.loads(path.read_text()))
    return definitions @ referencing.Registry()


def validate(obj: Obj) -> str | None:
    """The object's first validation error, or None."""
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        schema = SCHEMAS.get(obj["kind"])
        if schema is None:
            return f"{where}: no schema for this Prometheus operator kind"
        validator = jsonschema.Draft202012Validator(schema, registry=_monitor_registry())
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
        return f"{where}: {errors[0].message} at {list(errors[0].path)}" if errors else None
    custom = validate_custom(obj)
    if custom is not False:  # a kind of a vendored CRD (KEDA, Gateway API)
        return custom or None
    try:
        kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(), strict=True)
    except kubernetes_validate.utils.ValidationError as exc:
        return f"{where}: {exc.message} at {list(exc.path)}"
    except kubernetes_validate.utils.SchemaNotFoundError as exc:
        return f"{where}: {exc.message}"
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_for_a_current_kubernetes(overlay: str) -> None:
    objs = render(overlay)
    errors = [error for obj in objs if (error := validate(obj))]
    assert errors == [], "\n".join(errors)
    kinds = {obj["kind"] for obj in objs}
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    } <= kinds


def test_prometheus_rule_carries_the_unit_tested_rules() -> None:
    """k8s/monitoring/prometheusrule.yaml is deploy/prometheus's rule file, regenerated."""
    path = ROOT / "deploy" / "prometheus" / "prometheusrule.py"
    spec = importlib.util.spec_from_file_location("prometheusrule", path)
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.TARGET.read_text() == generator.render(), f"run python {path}"


def test_monitoring_crds_are_a_directory_of_their_own() -> None:
    """On a cluster without the Prometheus operator, `kubectl apply` of a ServiceMonitor fails:
    what `fleetserve render k8s` makes holds none, k8s/monitoring (which an overlay may leave
    out) all."""
    monitoring = "monitoring.coreos.com/"
    directories = [*(f"overlays/{overlay}/rendered" for overlay in OVERLAYS), "monitoring"]
    for directory in directories:
        expected = directory == "monitoring"
        result = subprocess.run(
            [require_tool("kubectl"), "kustomize", str(ROOT / "k8s" / directory)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        objs = [obj for obj in yaml.safe_load_all(result.stdout) if obj]
        assert objs and all(obj["apiVersion"].startswith(monitoring) == expected for obj in objs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_command_passes(overlay: str, tmp_path: Path) -> None:
    """The same check as above through the tool's own command line, as an operator runs it."""
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(_render(overlay))
    version = kubernetes_validate.utils.latest_version()
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # what it cannot know: the Prometheus operator's and KEDA's kinds (validate() above)
    custom = ("monitoring.coreos.com/", "keda.sh/")
    unknown = [line for line in output.splitlines() if not line.startswith("INFO")]
    assert all(any(group[:-1] in line for group in custom) for line in unknown), output
    passed = sum(line.startswith("INFO") and "passed" in line for line in output.splitlines())
    crds = sum(obj["apiVersion"].startswith(custom) for obj in render(overlay))
    assert passed == len(render(overlay)) - crds


def test_validation_catches_a_typo() -> None:
    """The checks above can fail: a misspelt field is refused, in a built-in kind and a CRD."""
    objs = render("cpu-demo")
    deployment = json.loads(json.dumps(component(objs, "gateway")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert validate(deployment) is not None
    monitor = json.loads(json.dumps(of_kind(objs, "PodMonitor")[0]))
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    assert validate(monitor) is not None


# -- what the workers run ----------------------------------------------------------------


@pytest.mark.parametrize(("overlay", "gpus"), OVERLAYS.items())
def test_workers_run_the_cluster_file(overlay: str, gpus: bool) -> None:
    objs = render(overlay)
    cluster = overlay_cluster(overlay)
    workers = {pod_labels(d)["fleetserve.io/model"]: d for d in component(objs, "worker")}
    assert sorted(workers) == sorted(spec.name for spec in cluster.models)
    for spec in cluster.models:
        deployment = workers[spec.name]
        if spec.autoscaling is None:  # else KEDA owns the count (test_autoscaling.py)
            assert deployment["spec"]["replicas"] == spec.replicas, spec.name
        else:
            assert "replicas" not in deployment["spec"], spec.name
        (container,) = pod_spec(deployment)["containers"]
        settings: WorkerSettings = container_settings(container)
        assert settings.served_name == spec.name
        assert settings.aliases == spec.aliases
        assert settings.engine == spec.engine
        assert settings.source == spec.source
        assert settings.routing_policy == spec.routing_policy
        assert settings.tensor_parallel_size == spec.tensor_parallel_size
        assert settings.pipeline_parallel_size == spec.pipeline_parallel_size
        assert settings.fallbacks == spec.fallbacks
        assert settings.start_timeout_s == spec.start_timeout_s
        assert split_flags(settings.engine_args) == split_flags(spec.engine_flags())
        resources = container.get("resources", {})
        requested = resources.get("requests", {}).get("nvidia.com/gpu")
        limited = resources.get("limits", {}).get("nvidia.com/gpu")
        if gpus:
            # one GPU per shard (tensor x pipeline), requested and limited alike
            ranks = spec.tensor_parallel_size * spec.pipeline_parallel_size
            assert requested == limited == ranks, spec.name
        else:
            assert requested is limited is None, spec.name
    (controller,) = component(objs, "controller")
    settings = container_settings(pod_spec(controller)["containers"][0])
    assert settings.heartbeat_interval_s == cluster.controller.heartbeat_interval_s
    assert settings.expiry_after_s == cluster.controller.expiry_after_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_reach_the_controller_and_advertise_their_pod(overlay: str) -> None:
    objs = render(overlay)
    service = named(objs, "Service", "fleetserve-controller")
    for deployment in [*component(objs, "worker"), *component(objs, "gateway")]:
        container = pod_spec(deployment)["containers"][0]
        settings = container_settings(container)
        assert settings.controller_url == (
            f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
        )
        if isinstance(settings, WorkerSettings):
            assert settings.host == "0.0.0.0"
            assert settings.advertise_host == POD_IP
            env = {e["name"]: e for e in container["env"]}
            assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            assert settings.port == named_port(pod_spec(deployment), "openai")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_have_shared_memory_and_a_model_cache(overlay: str) -> None:
    for deployment in component(render(overlay), "worker"):
        pod = pod_spec(deployment)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"  # NCCL
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["HF_HOME"].startswith("/models/") and "/models" in mounts
        models = volumes[mounts["/models"]]
        if overlay == "gpu":  # weights downloaded once, kept across restarts and replicas
            claim = models["persistentVolumeClaim"]["claimName"]
            pvc = named(render(overlay), "PersistentVolumeClaim", claim)
            assert "ReadWriteMany" in pvc["spec"]["accessModes"]
            assert pvc["spec"]["storageClassName"]  # the default classes are ReadWriteOnce
            assert "emptyDir" not in models


# -- rollouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_a_grace_period_longer_than_the_drain(overlay: str) -> None:
    objs = render(overlay)
    for deployment in of_kind(objs, "Deployment"):
        for container in pod_spec(deployment)["containers"]:
            assert "readinessProbe" in container and "livenessProbe" in container, container["name"]
    for deployment in component(objs, "worker"):
        pod = pod_spec(deployment)
        container = pod["containers"][0]
        settings: WorkerSettings = container_settings(container)
        readiness = container["readinessProbe"]["httpGet"]
        liveness = container["livenessProbe"]["httpGet"]
        # on the agent's status server, which says ready only while the engine is
        assert named_port(pod, readiness["port"]) == settings.status_port
        assert readiness["path"] == "/health"
        assert named_port(pod, liveness["port"]) == settings.status_port
        assert liveness["path"] == "/live"
        drain_s = constants.DRAIN_MIN_S + constants.DRAIN_TIMEOUT_S + constants.REAPER_STOP_GRACE_S
        assert pod["terminationGracePeriodSeconds"] > drain_s
        # a rollout is not declared failed while the engine is within its start-up budget
        assert deployment["spec"]["progressDeadlineSeconds"] > settings.start_timeout_s
        # the agent answers probes from a machine busy loading or serving
        assert container["readinessProbe"]["timeoutSeconds"] >= 5
        assert container["livenessProbe"]["timeoutSeconds"] >= 5
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
    for deployment in component(objs, "gateway"):
        pod = pod_spec(deployment)
        gateway = pod["containers"][0]
        settings = container_settings(gateway)
        pre_stop_s = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
        # a terminating gateway lets every request run its course before it is killed
        assert settings.drain_timeout_s >= settings.request_timeout_s
        assert pod["terminationGracePeriodSeconds"] > pre_stop_s + settings.drain_timeout_s
        # ready only with a routing table (gateway/admin.py /ready); alive while it runs
        assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_scales_and_keeps_a_replica_through_disruptions(overlay: str) -> None:
    objs = render(overlay)
    (gateway,) = component(objs, "gateway")
    (hpa,) = of_kind(objs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", gateway["metadata"]["name"])
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replica count"
    assert pod_spec(gateway)["containers"][0]["resources"]["requests"]["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    budgets = of_kind(objs, "PodDisruptionBudget")
    for deployment in [gateway, *component(objs, "worker")]:
        matching = [b for b in budgets if selects(b["spec"]["selector"], pod_labels(deployment))]
        assert len(matching) == 1, deployment["metadata"]["name"]
        # and only its own pods: a worker budget must not count another model's replicas
        others = [d for d in of_kind(objs, "Deployment") if d is not deployment]
        assert not any(selects(matching[0]["spec"]["selector"], pod_labels(d)) for d in others)


# -- security ----------------------------------------------------------------------------


def _peer_allows(peer: Obj, labels: dict[str, str]) -> bool:
    return "ipBlock" not in peer and selects(peer.get("podSelector", {}), labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_gateways_reach_the_engines(overlay: str) -> None:
    objs = render(overlay)
    (gateway,) = component(objs, "gateway")
    gateway_labels = pod_labels(gateway)
    for worker in component(objs, "worker"):
        labels = pod_labels(worker)
        engine_port = named_port(pod_spec(worker), "openai")
        policies = [
            p for p in of_kind(objs, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)
        ]
        assert policies, f"no NetworkPolicy isolates {worker['metadata']['name']}"
        assert all("Ingress" in p["spec"]["policyTypes"] for p in policies)
        opening = [  # rules that open the engine's port
            rule
            for p in policies
            for rule in p["spec"].get("ingress", [])
            if not rule.get("ports")
            or any(port.get("port") in ("openai", engine_port) for port in rule["ports"])
        ]
        assert opening, "the gateway cannot reach the engine"
        for rule in opening:
            peers = rule.get("from")
            assert peers, "a rule opens the engine's port to everyone"
            for peer in peers:
                # same namespace (no namespaceSelector), gateway pods only
                assert "namespaceSelector" not in peer and "ipBlock" not in peer, peer
                assert _peer_allows(peer, gateway_labels), peer
                assert not _peer_allows(peer, labels), "workers may not call each other"
        # Prometheus keeps its way to the metrics port
        status_rules = [
            rule
            for p in policies
            for rule in p["spec"].get("ingress", [])
            if any(port.get("port") == "status" for port in rule.get("ports", []))
        ]
        assert any(
            peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
            == "prometheus"
            for rule in status_rules
            for peer in rule["from"]
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_on_a_read_only_root_filesystem(overlay: str) -> None:
    # every image (the last USER of each target but the shared `python` stage) runs as 1000
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.M)[1:]
    images = [stage for stage in stages if not stage.startswith("python:")]
    dockerfile_user = {re.findall(r"^USER (\d+)$", stage, re.M)[-1] for stage in images}
    assert dockerfile_user == {"1000"}
    for deployment in of_kind(render(overlay), "Deployment"):
        pod = pod_spec(deployment)
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert str(context["runAsUser"]) in dockerfile_user  # the image's user owns /cache
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False  # fleetserve never calls the API
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_targets_of_the_dockerfile(overlay: str) -> None:
    targets = set(re.findall(r"^FROM \S+ AS (\w+)$", (ROOT / "Dockerfile").read_text(), re.M))
    for deployment in of_kind(render(overlay), "Deployment"):
        image = pod_spec(deployment)["containers"][0]["image"]
        assert image.rsplit("-", 1)[-1] in targets, image
        expected = "cuda" if overlay == "gpu" else "cpu"
        container = pod_spec(deployment)["containers"][0]
        if container["args"][0] == "worker" and container_settings(container).engine == "vllm":
            assert image.endswith("-" + expected), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_reads_its_api_keys_from_a_secret(overlay: str) -> None:
    objs = render(overlay)
    (gateway,) = component(objs, "gateway")
    pod = pod_spec(gateway)
    settings: GatewaySettings = container_settings(pod["containers"][0])
    assert settings.keys_file and not settings.keys
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if mounts.get(v["name"]) == "/etc/fleetserve/keys"]
    assert str(Path(settings.keys_file).parent) == mounts[volume["name"]]
    assert not volume["secret"].get("optional"), "a gateway without its keys would be open"
    secrets = [
        s
        for s in of_kind(objs, "Secret")
        if s["metadata"]["name"] == volume["secret"]["secretName"]
    ]
    if overlay == "cpu-demo":
        (secret,) = secrets
        keys_yaml = base64.b64decode(secret["data"][Path(settings.keys_file).name])
        assert KeysFile.model_validate(yaml.safe_load(keys_yaml)).keys
    else:
        assert secrets == [], "real clusters create their keys Secret themselves"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_component_reads_the_cluster_token_from_a_secret(overlay: str) -> None:
    """Controller, gateways and workers read one Secret's file (not an argument, which `ps`
    shows, nor an environment variable, which would need a restart to rotate)."""
    objs = render(overlay)
    secret_names = set()
    for deployment in [d for n in ("controller", "gateway", "worker") for d in component(objs, n)]:
        pod = pod_spec(deployment)
        container = pod["containers"][0]
        settings = container_settings(container)
        assert settings.cluster_token_file, deployment["metadata"]["name"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume_name = mounts[str(Path(settings.cluster_token_file).parent)]
        (volume,) = [v for v in pod["volumes"] if v["name"] == volume_name]
        assert not volume["secret"].get("optional"), "a controller without it would be open"
        secret_names.add(volume["secret"]["secretName"])
        assert "FLEETSERVE_CLUSTER_TOKEN" not in {e["name"] for e in container.get("env", [])}
    (name,) = secret_names  # one token for the whole cluster
    secrets = [s for s in of_kind(objs, "Secret") if s["metadata"]["name"] == name]
    if overlay == "cpu-demo":
        (secret,) = secrets
        assert base64.b64decode(secret["data"][Path(settings.cluster_token_file).name])
    else:
        assert secrets == [], "real clusters make their token themselves"


# -- monitoring --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_monitors_select_real_ports(overlay: str) -> None:
    objs = render(overlay)
    deployments = of_kind(objs, "Deployment")
    services = of_kind(objs, "Service")
    for service in services:
        backing = [
            d
            for d in deployments
            if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(d))
        ]
        assert len(backing) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            named_port(pod_spec(backing[0]), port["targetPort"])
    (service_monitor,) = of_kind(objs, "ServiceMonitor")
    monitored = [
        s for s in services if selects(service_monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert {
        pod_labels(d)["app.kubernetes.io/component"]
        for s in monitored
        for d in deployments
        if selects({"matchLabels": s["spec"]["selector"]}, pod_labels(d))
    } == {"controller", "gateway"}
    for service in monitored:
        names = {port["name"] for port in service["spec"]["ports"]}
        assert {e["port"] for e in service_monitor["spec"]["endpoints"]} <= names
    (pod_monitor,) = of_kind(objs, "PodMonitor")
    workers = component(objs, "worker")
    assert workers and all(selects(pod_monitor["spec"]["selector"], pod_labels(w)) for w in workers)
    for worker in workers:
        for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
            port = named_port(pod_spec(worker), endpoint["port"])
            assert port == container_settings(pod_spec(worker)["containers"][0]).status_port
