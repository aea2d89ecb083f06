"""`fleetserve render k8s`: every example cluster file as valid Kubernetes objects.

The renderer runs in-process (one CLI run at the end, and `kubectl kustomize` of what it
wrote). Objects are validated as test_manifests validates the overlays (kubernetes-validate
strict; KEDA's kinds against their vendored CRD schemas). Then what a user relies on: a
model's change touches its own worker and nothing else, a field Kubernetes cannot honour is
refused by name before anything is written, the overlays' rendered/ directories are what
their cluster files give, and an on-demand model idles at zero until a held request, which
the rendered controller (the real app, in-process) counts in the load KEDA reads.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controller.api import build_app
from controller.settings import ControllerSettings
from fleetserve.cli import main
from fleetserve.cli.args import validation_context
from fleetserve.cli.cluster import ClusterConfig, load_cluster_file, parse_cluster
from fleetserve.cli.controller import declared_models
from fleetserve.cli.k8s import render
from fleetserve.cli.k8s.common import worker_name
from fleetserve.cli.render import write
from fleetserve.errors import ConfigError
from gateway.settings import GatewaySettings
from tests.k8s.test_manifests import OVERLAYS, ROOT, Obj, container_settings, validate
from tests.tools import require_tool
from workers.settings import Device, WorkerSettings

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
#: each overlay's options to `render k8s` (its kustomization.yaml says the same)
OVERLAY_OPTIONS = {"cpu-demo": Device.CPU, "gpu": Device.CUDA}


def _objects(cluster: ClusterConfig, device: Device = Device.CUDA) -> dict[tuple[str, str], Obj]:
    """Every rendered object by (kind, name)."""
    found = {}
    for objs in render(cluster, device).values():
        for obj in objs:
            key = (obj["kind"], obj["metadata"]["name"])
            assert key not in found, key
            found[key] = obj
    return found


def _parse(data: dict[str, Any]) -> ClusterConfig:
    return parse_cluster(data, origin="test", context=validation_context())


def _worker(objs: dict[tuple[str, str], Obj], model: str) -> tuple[Obj, WorkerSettings]:
    deployment = objs[("Deployment", worker_name(model))]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container_settings(container)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_renders_as_valid_objects(path: Path) -> None:
    cluster = load_cluster_file(path, context=validation_context())
    objs = _objects(cluster)
    errors = [error for obj in objs.values() if (error := validate(obj))]
    assert errors == [], "\n".join(errors)
    for spec in cluster.models:
        deployment, settings = _worker(objs, spec.name)
        assert (settings.served_name, settings.aliases) == (spec.name, spec.aliases)
        assert settings.tensor_parallel_size == spec.tensor_parallel_size
        resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        vllm = spec.engine in (None, "vllm")
        assert gpus == (spec.tensor_parallel_size * spec.pipeline_parallel_size if vllm else None)
        assert ("PodDisruptionBudget", worker_name(spec.name)) in objs
    kinds = {kind for kind, _ in objs}
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds
    assert {"PodDisruptionBudget", "NetworkPolicy"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlays_list_what_their_cluster_file_renders(overlay: str, tmp_path: Path) -> None:
    directory = ROOT / "k8s" / "overlays" / overlay
    cluster = load_cluster_file(directory / "cluster.yaml", context=validation_context())
    write(render(cluster, OVERLAY_OPTIONS[overlay]), tmp_path, "cluster.yaml")
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.yaml")}
    rendered = directory / "rendered"
    committed = {p.relative_to(rendered): p.read_text() for p in rendered.rglob("*.yaml")}
    device = OVERLAY_OPTIONS[overlay].value
    assert committed == fresh, (
        f"run: cd {directory.relative_to(ROOT)} && "
        f"fleetserve render k8s -f cluster.yaml -o rendered --device {device}"
    )


_TWO_MODELS = {
    "models": [
        {
            "name": "llama-70b",
            "source": "meta-llama/Llama-3.1-70B-Instruct",
            "tensor_parallel_size": 4,
            "replicas": 2,
            "engine_args": {"max_num_seqs": 64},
        },
        {"name": "qwen-7b", "source": "Qwen/Qwen2.5-7B-Instruct", "replicas": 2},
        {"name": "echo", "engine": "fake", "load": "on_demand", "idle_timeout_s": 120},
    ]
}


@pytest.mark.parametrize(
    ("model", "change"),
    [
        ("llama-70b", {"tensor_parallel_size": 8}),
        ("llama-70b", {"replicas": 3}),
        ("llama-70b", {"engine_args": {"max_num_seqs": 32, "enable_prefix_caching": True}}),
        ("qwen-7b", {"tensor_parallel_size": 2, "replicas": 1}),
        ("echo", {"replicas": 4}),  # on demand: the replicas it wakes up to
    ],
)
def test_a_models_parallelism_replicas_or_engine_args_change_its_worker_only(
    model: str, change: dict[str, Any]
) -> None:
    data = copy.deepcopy(_TWO_MODELS)
    before = _objects(_parse(data))
    (entry,) = [m for m in data["models"] if m["name"] == model]
    entry.update(change)
    spec = next(s for s in _parse(data).models if s.name == model)
    after = _objects(_parse(data))
    assert set(after) == set(before)
    changed = {key for key in after if after[key] != before[key]}
    assert changed, "the change is not rendered"
    name = worker_name(model)
    assert changed <= {("Deployment", name), ("ScaledObject", name)}, changed
    deployment, settings = _worker(after, model)
    assert settings.tensor_parallel_size == spec.tensor_parallel_size
    assert settings.engine_args == spec.engine_flags()
    if ("ScaledObject", name) in after:
        scaled = after[("ScaledObject", name)]["spec"]
        assert scaled["maxReplicaCount"] == spec.replicas
    else:
        assert deployment["spec"]["replicas"] == spec.replicas


def test_a_field_kubernetes_cannot_honour_is_refused_by_name_before_writing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "gateway": {"processes": 4},
                "models": [
                    {"name": "big", "source": "org/big", "pipeline_parallel_size": 2, "nodes": 2},
                    {"name": "ok", "engine": "fake"},
                    {"name": "far", "engine": "openai", "url": "http://10.0.0.7:8000/v1"},
                ],
            }
        )
    )
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main(["render", "k8s", "-f", str(path), "-o", str(out)])
    message = str(exited.value.code)
    assert f"{path} asks for what k8s cannot do" in message
    lines = {line.strip().split(": ")[0]: line for line in message.splitlines()[1:]}
    assert set(lines) == {"gateway.processes", "models[0].nodes", "models[2].url"}
    assert "scale gateway pods instead" in lines["gateway.processes"]
    assert "LeaderWorkerSet" in lines["models[0].nodes"]
    assert "attached servers" in lines["models[2].url"]
    assert not out.exists()
    # names Kubernetes cannot tell apart (lowercase, '-' for the rest; 'Echo_1' is fine alone)
    assert worker_name("Echo_1") == "fleetserve-worker-echo-1"
    same = {"models": [{"name": "Echo_1", "engine": "fake"}, {"name": "echo-1", "engine": "fake"}]}
    with pytest.raises(ConfigError, match="'Echo_1' and 'echo-1' are both 'echo-1'"):
        render(_parse(same))


def test_the_gateway_runs_the_files_settings_and_drains_its_requests() -> None:
    cluster = _parse(
        {
            "gateway": {
                "routing_policy": "prefix_affinity",
                "request_timeout_s": 900,
                "hold_timeout_s": 30,
                "max_tokens_limit": 4096,
                "keys": [{"name": "team", "key_sha256": "a" * 64}],
            },
            "models": [{"name": "echo", "engine": "fake"}],
        }
    )
    objs = _objects(cluster)
    pod = objs[("Deployment", "fleetserve-gateway")]["spec"]["template"]["spec"]
    settings: GatewaySettings = container_settings(pod["containers"][0])
    assert settings.routing_policy == "prefix_affinity"
    assert (settings.request_timeout_s, settings.hold_timeout_s) == (900, 30)
    assert settings.max_tokens_limit == 4096
    assert settings.drain_timeout_s == 900  # every request runs its course on a scale-down
    assert pod["terminationGracePeriodSeconds"] > 5 + 900
    assert objs[("Secret", "fleetserve-api-keys")]["data"]["keys.yaml"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_an_on_demand_model_idles_at_zero_until_a_held_request(tmp_path: Path) -> None:
    """Its ScaledObject idles the workers at zero and reads the controller's load, which the
    rendered controller (the real app, reading the rendered models file) raises to 1 when a
    gateway holds a request for the model: KEDA's activation."""
    objs = _objects(_parse(_TWO_MODELS))
    name = "fleetserve-worker-echo"
    assert "replicas" not in objs[("Deployment", name)]["spec"]  # KEDA's to set
    scaled = objs[("ScaledObject", name)]["spec"]
    assert (scaled["idleReplicaCount"], scaled["minReplicaCount"]) == (0, 1)
    assert scaled["cooldownPeriod"] == 120  # idle_timeout_s
    (trigger,) = scaled["triggers"]
    assert trigger["metadata"]["valueLocation"] == "ongoing"
    assert ("ScaledObject", "fleetserve-worker-llama-70b") not in objs  # always, fixed count
    # the controller as rendered: its models file from the ConfigMap
    controller = objs[("Deployment", "fleetserve-controller")]["spec"]["template"]["spec"]
    settings: ControllerSettings = container_settings(controller["containers"][0])
    models = objs[("ConfigMap", "fleetserve-models")]["data"]
    (tmp_path / "models.yaml").write_text(models[Path(settings.models_file or "").name])
    rendered = ControllerSettings(models_file=str(tmp_path / "models.yaml"))
    app = build_app(rendered, declared_models(rendered))  # as `fleetserve controller` does
    url = httpx.URL(trigger["metadata"]["url"])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://controller"
    ) as client:
        declared = {m["name"]: m for m in (await client.get("/models")).json()}
        assert set(declared) == {"llama-70b", "qwen-7b", "echo"}
        assert declared["echo"]["state"] == "scaled_to_zero"
        assert declared["llama-70b"]["state"] == "starting"
        assert (await client.get(url.path)).json()["ongoing"] == 0
        (await client.post("/models/echo/demand")).raise_for_status()  # a gateway holds one
        assert (await client.get(url.path)).json()["ongoing"] == 1


def test_a_model_autoscaled_from_zero_is_declared_with_no_replica_wanted() -> None:
    """``min_replicas: 0``: KEDA may take its workers to zero, so a gateway holding a request
    for it must tell the controller (it does for a model with no replica wanted), whose load
    KEDA reads."""
    model = {"name": "qwen-7b", "source": "Qwen/Qwen2.5-7B-Instruct"}
    scaling = {"min_replicas": 0, "max_replicas": 3}
    objs = _objects(_parse({"models": [{**model, "autoscaling": scaling}]}))
    assert objs[("ScaledObject", "fleetserve-worker-qwen-7b")]["spec"]["minReplicaCount"] == 0
    (models,) = objs[("ConfigMap", "fleetserve-models")]["data"].values()
    (declared,) = parse_cluster(yaml.safe_load(models)).models
    assert declared.declaration().replicas == 0


def test_render_k8s_writes_a_directory_kustomize_renders(tmp_path: Path) -> None:
    """The command as a user runs it, then `kubectl kustomize` of its output."""
    out, example = tmp_path / "k8s", ROOT / "examples" / "gpu-node.yaml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetserve.cli",
            "render",
            "k8s",
            "-f",
            str(example),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"{out}: 6 files, 2 model(s)" in done.stdout
    kustomized = subprocess.run(
        [require_tool("kubectl"), "kustomize", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert kustomized.returncode == 0, kustomized.stderr
    objs = [obj for obj in yaml.safe_load_all(kustomized.stdout) if obj]
    assert [error for obj in objs if (error := validate(obj))] == []
    workers = {o["metadata"]["name"] for o in objs if o["kind"] == "Deployment"}
    assert workers >= {"fleetserve-worker-llama-3.1-8b", "fleetserve-worker-qwen2.5-32b"}


def test_rendering_again_removes_the_files_of_models_no_longer_in_the_file(
    tmp_path: Path,
) -> None:
    write(render(_parse(_TWO_MODELS)), tmp_path, "cluster.yaml")
    assert (tmp_path / "workers" / "llama-70b.yaml").exists()
    assert (tmp_path / "autoscaling.yaml").exists()  # echo is on demand: KEDA reads the load
    write(render(_parse({"models": [_TWO_MODELS["models"][1]]})), tmp_path, "cluster.yaml")
    assert sorted(p.name for p in (tmp_path / "workers").iterdir()) == ["qwen-7b.yaml"]
    assert not (tmp_path / "autoscaling.yaml").exists()
    kustomization = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [
        "controller.yaml",
        "gateway.yaml",
        "networkpolicy.yaml",
        "workers/qwen-7b.yaml",
    ]


def test_render_k8s_help_says_what_it_makes_and_what_it_leaves_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["render", "k8s", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for part in (
        "worker Deployment",
        "KEDA ScaledObject",
        "on demand",
        "refused, by name",
        "--models-file",
        "kubectl apply -k DIR",
        "Not rendered: the namespace",
    ):
        assert part in text, part
