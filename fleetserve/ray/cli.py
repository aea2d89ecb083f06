"""`fleetserve ray deploy|status|down`: the models of a cluster file on a Ray cluster."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fleetserve.auth import client_token
from fleetserve.cli.args import add_controller_url, validation_context
from fleetserve.cli.cluster import load_cluster_file
from fleetserve.cli.status import make_console
from fleetserve.cli.targets import Target, check


def cmd_ray(args: argparse.Namespace) -> int:
    # Here, not at the top: deploy.py imports fleetserve.cli, whose __init__ imports this
    # module (importing fleetserve.ray.deploy first failed on the partial module).
    from fleetserve.ray.deploy import deploy, down, status

    console = make_console()
    token = client_token(args.cluster_token_file)
    if args.ray_command == "deploy":
        cluster = load_cluster_file(args.file, context=validation_context())
        check(cluster, Target.RAY, str(args.file))  # before anything reaches Ray
        return deploy(cluster, args.controller_url, args.address, console, token, args.ca_file)
    if args.ray_command == "status":
        return status(args.controller_url, args.address, console, token, args.ca_file)
    return down(args.address, console, args.controller_url, token, args.ca_file)


def register(sub: Any) -> None:
    ray = sub.add_parser(
        "ray",
        help="Run the workers of a cluster file on a Ray cluster (Ray Serve deployments).",
        description="Every model's replicas as Ray Serve deployments: Ray places them on "
        "nodes with the GPUs they need, replaces dead ones and autoscales them. Controller "
        "and gateway run as usual (`fleetserve controller`, `fleetserve gateway`).",
    )
    ray_sub = ray.add_subparsers(dest="ray_command", required=True, metavar="RAY_COMMAND")
    ray_deploy = ray_sub.add_parser(
        "deploy",
        help="Deploy or update the models of a cluster file; rolls changed models "
        "a replica at a time, each draining first.",
    )
    ray_deploy.add_argument("-f", "--file", type=Path, required=True, help="Cluster YAML file.")
    ray_sub.add_parser("status", help="Ray's replicas next to the workers the controller knows.")
    ray_sub.add_parser("down", help="Remove every model from Ray; replicas drain first.")
    for command in ray_sub.choices.values():
        command.add_argument(
            "--address",
            help="The Ray cluster (host:port or ray://host:10001; default: the local one, "
            "or RAY_ADDRESS).",
        )
        add_controller_url(command, "The fleetserve controller, as the Ray nodes reach it")
    ray.set_defaults(func=cmd_ray)
