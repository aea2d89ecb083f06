"""The `fleetserve` command: run a whole local cluster, or one component of a real one."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fleetserve import __version__, constants
from fleetserve.bench import add_bench_command
from fleetserve.chat import add_chat_command
from fleetserve.cli_args import add_controller_url, add_settings_arguments, settings_from
from fleetserve.config import (
    ClusterConfig,
    ConfigError,
    ControllerSettings,
    Device,
    GatewaySettings,
    WorkerSettings,
    default_cluster,
    engine_args_from_flags,
    load_cluster_file,
    parse_cluster,
)
from fleetserve.model_commands import add_model_commands
from fleetserve.raydeploy import add_ray_commands

logger = logging.getLogger("fleetserve")


def _serve(app: Any, host: str, port: int, graceful_s: float, **options: Any) -> None:
    import uvicorn

    # uvicorn picks uvloop and httptools when installed ([standard] extra).
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # fleetserve reads no X-Forwarded-*: skip that middleware
        server_header=False,
        timeout_graceful_shutdown=int(graceful_s),
        **options,
    )


def cmd_controller(args: argparse.Namespace) -> int:
    from controller.api import build_app

    settings: ControllerSettings = settings_from(ControllerSettings, args)
    logger.info("controller listening on http://%s:%d", settings.host, settings.port)
    # Its only long requests are gateways' long-polls, which retry: no need to wait for them.
    _serve(build_app(settings), settings.host, settings.port, graceful_s=1)
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.app import SETTINGS_ENV, build_app

    settings: GatewaySettings = settings_from(GatewaySettings, args)
    if not settings.controller_url:
        sys.exit("fleetserve gateway: --controller-url is required")
    logger.info(
        "gateway listening on http://%s:%d/v1 (%d processes)",
        settings.host,
        settings.port,
        settings.processes,
    )
    # Let streams in flight finish (workers drain before the gateway stops in `up`).
    graceful_s = constants.STOP_GRACE_S
    if settings.processes == 1:
        _serve(build_app(settings), settings.host, settings.port, graceful_s)
        return 0
    # uvicorn's worker processes import the app by name and rebuild it from these settings.
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    _serve(
        "gateway.app:build_app_from_environment",
        settings.host,
        settings.port,
        graceful_s,
        factory=True,
        workers=settings.processes,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.agent import run_worker

    settings: WorkerSettings = settings_from(WorkerSettings, args, engine_args=args.engine_args)
    return run_worker(settings)


def _one_model_cluster(args: argparse.Namespace) -> ClusterConfig:
    """`up --model SOURCE ...`: the cluster file one would write for a single model."""
    from workers.inventory import discover_machine

    ranks = args.tensor_parallel_size * args.pipeline_parallel_size
    replicas = args.replicas or max(1, len(discover_machine().gpus) // ranks)  # fill the GPUs
    source = Path(args.model).expanduser()
    name = args.name or (source.name if source.is_dir() else args.model)
    spec = {
        "name": name,
        "engine": args.engine,
        "source": str(source) if source.is_dir() else args.model,
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "replicas": replicas,
        "engine_args": engine_args_from_flags(args.engine_args),
    }
    return parse_cluster({"models": [spec]}, origin="--model")


def cmd_up(args: argparse.Namespace) -> int:
    from fleetserve.local import run_local_cluster

    try:
        if args.file:
            if args.engine_args:
                sys.exit(
                    "fleetserve up: engine flags after `--` go with --model; in a cluster "
                    "file, give each model its engine_args"
                )
            cluster = load_cluster_file(args.file)
        elif args.model:
            cluster = _one_model_cluster(args)
        else:
            cluster = default_cluster()
        if args.port is not None:
            cluster.gateway.port = args.port
        if args.controller_port is not None:
            cluster.controller.port = args.controller_port
        if args.host is not None:
            cluster.gateway.host = cluster.controller.host = args.host
        return run_local_cluster(cluster, args.device, args.advertise_host, args.log_dir)
    except ConfigError as exc:
        sys.exit(f"fleetserve up: {exc}")


def cmd_status(args: argparse.Namespace) -> int:
    from fleetserve.status import make_console, print_status

    return print_status(make_console(), args.controller_url, args.watch)


def cmd_key_new(args: argparse.Namespace) -> int:
    import secrets

    import yaml

    from fleetserve.config import ApiKey
    from gateway.auth import hash_key

    key = "sk-fs-" + secrets.token_urlsafe(32)
    entry = ApiKey(
        name=args.name, key_sha256=hash_key(key), models=args.models, rpm=args.rpm, tpm=args.tpm
    )
    print(f"API key (shown once, store it now): {key}\n")
    print("Add this entry to the gateway's keys file (or gateway.keys in the cluster file):")
    entries = {"keys": [entry.model_dump(mode="json", exclude_none=True)]}
    print(yaml.safe_dump(entries, sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetserve",
        description="One OpenAI-compatible endpoint in front of many model workers.",
    )
    parser.add_argument("--version", action="version", version=f"fleetserve {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from gateway.routing import RoutingPolicy
    from workers.engines import Engine

    up = sub.add_parser(
        "up",
        help="Run controller, gateway and every worker of a cluster file on this machine.",
        description="Start a whole cluster here; Ctrl-C stops it cleanly. Without -f or "
        "--model: the tiny demo model on vLLM (made locally on first use). With --model, "
        "flags after `--` go to the engine: `fleetserve up --model M -- --max-model-len 4096`.",
    )
    source = up.add_mutually_exclusive_group()
    source.add_argument(
        "-f", "--file", type=Path, help="Cluster YAML file (default: the demo cluster)."
    )
    source.add_argument(
        "--model", help="Serve this one model (hub id or local directory) instead of a file."
    )
    one = up.add_argument_group("with --model")
    one.add_argument("--name", help="The name clients ask for (default: the model id).")
    one.add_argument(
        "--engine", default="vllm", choices=sorted(Engine.registry), help="Default: vllm."
    )
    one.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica.")
    one.add_argument(
        "--pipeline-parallel-size", type=int, default=1, help="Pipeline stages per replica."
    )
    one.add_argument(
        "--replicas", type=int, help="Replicas (default: as many as the GPUs hold, at least 1)."
    )
    up.add_argument(
        "--device",
        type=Device,
        choices=list(Device),
        default=Device.AUTO,
        help="auto: the GPUs when there are any, else vLLM's CPU build for single-rank models; "
        "cpu: vLLM's CPU build even for TP/PP > 1 (one core per rank). Default: auto.",
    )
    up.add_argument("--port", type=int, help="Gateway port (overrides the file; default 8000).")
    up.add_argument("--controller-port", type=int, help="Controller port (default 8001).")
    up.add_argument(
        "--host",
        help="Address gateway, controller and engines listen on (default 127.0.0.1; "
        "0.0.0.0 to be reached from other machines).",
    )
    up.add_argument(
        "--advertise-host",
        help="Address other machines reach this one at; workers register with it "
        "(default: --host, or 127.0.0.1 for 0.0.0.0).",
    )
    up.add_argument(
        "--log-dir", type=Path, help="Where component logs go (default: under ~/.cache/fleetserve)."
    )
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="Show the workers and models a controller knows.")
    add_controller_url(status, "The controller's URL")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="Redraw every SECONDS (default 2) with tokens/s, until Ctrl-C.",
    )
    status.set_defaults(func=cmd_status)

    add_ray_commands(sub)
    add_model_commands(sub)

    controller = sub.add_parser("controller", help="Run the controller (the worker registry).")
    add_settings_arguments(controller, ControllerSettings)
    controller.set_defaults(func=cmd_controller)

    gateway = sub.add_parser("gateway", help="Run a gateway (the OpenAI endpoint).")
    add_settings_arguments(gateway, GatewaySettings, skip=("keys",))
    gateway.set_defaults(func=cmd_gateway)

    add_chat_command(sub)
    add_bench_command(sub)

    key = sub.add_parser("key", help="API keys for the gateway.")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="KEY_COMMAND")
    key_new = key_sub.add_parser(
        "new",
        help="Make a new API key; prints it once, and the entry (its hash) for the keys file.",
    )
    key_new.add_argument("--name", required=True, help="Who holds the key.")
    key_new.add_argument(
        "--model", dest="models", action="append", help="A model it may use (repeat; default: all)."
    )
    key_new.add_argument("--rpm", type=int, help="Requests per minute (default: no limit).")
    key_new.add_argument("--tpm", type=int, help="Tokens per minute (default: no limit).")
    key_new.set_defaults(func=cmd_key_new)

    worker = sub.add_parser(
        "worker",
        help="Run one model replica: engine + agent that registers it.",
        description="Run one model replica. Flags after `--` go to the engine, e.g. "
        "`fleetserve worker --served-name m --model /models/m -- --max-num-seqs 64`.",
    )
    registered = {
        "engine": sorted(Engine.registry),
        "routing_policy": sorted(RoutingPolicy.registry),
    }
    add_settings_arguments(worker, WorkerSettings, skip=("engine_args",), choices=registered)
    worker.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    engine_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, engine_args = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    args.engine_args = engine_args
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat is noise
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
