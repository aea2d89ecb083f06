"""Worker pods on the GPUs their model asks for, with its weights pulled before they start.

The overlays rendered as test_manifests renders them: ``gpu:`` in the cluster file as node
affinity on NVIDIA GPU feature discovery's labels; the ``pull`` init container running
`fleetserve model pull` for the pod's own model (run here against a hub on loopback), the
worker then only reading the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetserve.cli import build_parser
from tests.k8s.test_manifests import (
    OVERLAYS,
    Obj,
    component,
    overlay_cluster,
    pod_labels,
    pod_spec,
    render,
)
from tests.workers.fakehub import FakeHub, HubFile, HubModel, start_hub
from workers.hub import is_hub_id


def _gpu_requirements(pod: Obj) -> dict[str, Obj]:
    affinity = pod.get("affinity", {}).get("nodeAffinity", {})
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms", [])
    assert len(terms) <= 1  # one term: its expressions are ANDed
    return {e["key"]: e for term in terms for e in term["matchExpressions"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_land_on_the_gpus_their_model_asks_for(overlay: str) -> None:
    """``gpu:`` in the cluster file: node affinity on NVIDIA GPU feature discovery's labels."""
    objs = render(overlay)
    cluster = overlay_cluster(overlay)
    workers = {pod_labels(d)["fleetserve.io/model"]: d for d in component(objs, "worker")}
    for spec in cluster.models:
        wanted = _gpu_requirements(pod_spec(workers[spec.name]))
        if spec.gpu is None:
            assert not {"nvidia.com/gpu.product", "nvidia.com/gpu.memory"} & set(wanted)
            continue
        product = wanted.get("nvidia.com/gpu.product")
        if spec.gpu.products:
            assert product is not None and product["operator"] == "In", spec.name
            assert product["values"] == spec.gpu.products
        else:
            assert product is None, spec.name
        memory = wanted.get("nvidia.com/gpu.memory")
        if spec.gpu.min_memory_gib:
            assert memory is not None and memory["operator"] == "Gt", spec.name
            # the label is in MiB; Gt is strict
            assert memory["values"] == [str(round(spec.gpu.min_memory_gib * 1024) - 1)]
        else:
            assert memory is None, spec.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_pull_their_own_model_first_and_then_only_read(overlay: str) -> None:
    objs = render(overlay)
    sources = {spec.name: spec.source for spec in overlay_cluster(overlay).models}
    pulling = 0
    for deployment in component(objs, "worker"):
        pod = pod_spec(deployment)
        (worker,) = pod["containers"]
        model = pod_labels(deployment)["fleetserve.io/model"]
        worker_env = {e["name"]: e for e in worker["env"]}
        # the worker reads the cache, fetches nothing and needs no token
        assert worker_env["HF_HUB_OFFLINE"]["value"] == "1"
        assert "HF_TOKEN" not in worker_env
        if not is_hub_id(sources[model]):  # the demo model, a local path: nothing to pull
            assert "initContainers" not in pod, model
            continue
        pulling += 1
        (pull,) = pod["initContainers"]
        assert pull["image"] == worker["image"]
        args = build_parser().parse_args(pull["args"])
        assert (args.command, args.model_command, args.source) == ("model", "pull", sources[model])
        # into the cache the worker reads
        env = {e["name"]: e for e in pull["env"]}
        assert env["HF_HOME"] == worker_env["HF_HOME"]
        mounts = {m["mountPath"]: m["name"] for m in pull["volumeMounts"]}
        worker_mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        assert mounts["/models"] == worker_mounts["/models"]
        # gated models: the token, where a Secret gives one
        token = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token["name"] == "fleetserve-hf-token" and token["optional"] is True
    assert pulling == (2 if overlay == "gpu" else 0)


def test_the_pull_init_containers_fetch_their_model_from_a_hub(tmp_path: Path) -> None:
    """The gpu overlay's init containers, run here against a hub on loopback: each pulls the
    source of its own model of the cluster file, nothing else."""
    objs = render("gpu")
    files = [HubFile("config.json", b"{}"), HubFile("model.safetensors", b"w" * 1024, lfs=True)]
    sources = {spec.name: spec.source for spec in overlay_cluster("gpu").models}
    hub = start_hub(FakeHub({source: HubModel(source, files) for source in sources.values()}))
    try:
        for deployment in component(objs, "worker"):
            (pull,) = pod_spec(deployment)["initContainers"]
            model = pod_labels(deployment)["fleetserve.io/model"]
            env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
            env |= {"HF_ENDPOINT": hub.hub.url, "HF_HOME": str(tmp_path / model)}
            hub.hub.requests.clear()
            done = subprocess.run(
                [sys.executable, "-m", "fleetserve.cli", *pull["args"]],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            assert f"pulling {sources[model]}: 1.0 KiB of 1.0 KiB (100%), done" in done.stdout
            assert all(sources[model] in r.path for r in hub.hub.requests)  # its own only
    finally:
        hub.stop()
