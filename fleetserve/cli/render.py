"""`fleetserve render k8s`: a cluster file as Kubernetes objects (fleetserve/cli/k8s/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fleetserve.cli.args import validation_context
from fleetserve.cli.cluster import load_cluster_file
from fleetserve.cli.k8s import Images, dump, render
from workers.settings import Device

#: Written at the top of every rendered file.
HEADER = (
    "# Rendered by `fleetserve render k8s` from {source}: change the cluster file and render\n"
    "# again; patch what it does not say in a kustomize overlay (k8s/README.md).\n"
)


def write(files: dict[str, list[dict[str, Any]]], out: Path, source: str) -> list[Path]:
    """Each file under ``out`` and a kustomization.yaml listing them; worker files of models
    no longer in the cluster file are removed. The paths written."""
    header = HEADER.format(source=source)
    (out / "workers").mkdir(parents=True, exist_ok=True)
    for stale in (out / "workers").glob("*.yaml"):
        if f"workers/{stale.name}" not in files:
            stale.unlink()
    (out / "autoscaling.yaml").unlink(missing_ok=True)  # written again below where needed
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(files),
    }
    written = []
    for name, objs in {**files, "kustomization.yaml": [kustomization]}.items():
        path = out / name
        path.write_text(header + dump(objs))
        written.append(path)
    return written


def cmd_render_k8s(args: argparse.Namespace) -> int:
    cluster = load_cluster_file(args.file, context=validation_context())
    images = Images(args.image, args.engine_image)
    files = render(cluster, Device(args.device), images, origin=str(args.file))
    if args.output is None:
        sys.stdout.write(HEADER.format(source=args.file.name))
        sys.stdout.write(dump([obj for objs in files.values() for obj in objs]))
        return 0
    written = write(files, args.output, args.file.name)
    models = len(cluster.models)
    print(f"{args.output}: {len(written)} files, {models} model(s); kubectl apply -k {args.output}")
    return 0


def register(sub: Any) -> None:
    render_parser = sub.add_parser(
        "render", help="Deployment files from a cluster file (Kubernetes: `render k8s`)."
    )
    targets = render_parser.add_subparsers(dest="render_target", required=True, metavar="TARGET")
    k8s = targets.add_parser(
        "k8s",
        help="Kubernetes objects for every model, the gateway and the controller.",
        description="Renders a cluster file as Kubernetes objects: per model a worker "
        "Deployment (its engine, tensor-parallel size, engine arguments, GPUs, the `pull` "
        "step for hub weights), a PodDisruptionBudget and, for a model with `autoscaling:` "
        "or `load: on_demand`, a KEDA ScaledObject on the controller's load for the model "
        "(on demand: idle at zero replicas, started by the first request a gateway holds, "
        "back to zero after idle_timeout_s); the controller, with the file's models declared "
        "(a ConfigMap it reads with --models-file); the gateway with the file's settings "
        "(routing, timeouts, limits; the file's API keys as the Secret fleetserve-api-keys); "
        "NetworkPolicies. A field Kubernetes cannot honour is refused, by name and with the "
        "reason, before anything is written. Not rendered: the namespace, the Secrets "
        "fleetserve-cluster-token (and fleetserve-api-keys without keys in the file), a "
        "shared volume for weights, the Prometheus operator's objects (k8s/monitoring): "
        "add them with a kustomize overlay that lists the output directory (k8s/overlays/).",
    )
    k8s.add_argument("-f", "--file", type=Path, required=True, help="The cluster YAML file.")
    k8s.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="DIR",
        help="Write one file per part (workers/NAME.yaml per model) and a kustomization.yaml "
        "into DIR, for `kubectl apply -k DIR` or an overlay; default: every object to "
        "standard output, for `kubectl apply -f -`.",
    )
    k8s.add_argument(
        "--device",
        choices=[Device.CUDA.value, Device.CPU.value],
        default=Device.CUDA.value,
        help="Where engines that use accelerators (vllm) run: cuda requests NVIDIA GPUs "
        "(tensor x pipeline parallel size per replica); cpu runs vLLM's CPU build, no GPU "
        "(default: %(default)s).",
    )
    k8s.add_argument(
        "--image",
        default=Images.service,
        help="Image of the controller and gateway (the Dockerfile's slim target; default: "
        "%(default)s, a name for kustomize's images: to replace).",
    )
    k8s.add_argument(
        "--engine-image",
        default=Images.engine,
        help="Image of the workers (the Dockerfile's cuda or cpu target; default: %(default)s).",
    )
    k8s.set_defaults(func=cmd_render_k8s)
