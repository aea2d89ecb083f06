"""The `fleetserve` command: run a whole local cluster, or one component of a real one.

Each command is a module of this package with a ``register(subparsers)`` function;
Ray's commands live with the rest of Ray (fleetserve/ray/). Errors fleetserve
raises on purpose (FleetserveError) end the command with their message, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fleetserve import __version__
from fleetserve.cli import (
    adapter,
    bench,
    chat,
    controller,
    gateway,
    key,
    model,
    render,
    status,
    up,
    worker,
)
from fleetserve.errors import FleetserveError
from fleetserve.ray import cli as ray_cli

COMMANDS = (
    up,
    status,
    ray_cli,
    model,
    render,
    adapter,
    controller,
    gateway,
    chat,
    bench,
    key,
    worker,
)


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
    for command in COMMANDS:
        command.register(sub)
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
    # one line per heartbeat (httpx), per hub request (huggingface_hub's httpx2): noise
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result: int = args.func(args)
    except FleetserveError as exc:
        sys.exit(f"fleetserve {args.command}: {exc}")
    return result
