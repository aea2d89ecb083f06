"""`fleetserve worker`: run one model replica, its engine and the agent that registers it."""

from __future__ import annotations

import argparse
from typing import Any

from fleetserve.cli.args import add_settings_arguments, settings_from
from workers.settings import WorkerSettings


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.agent import run_worker

    settings: WorkerSettings = settings_from(WorkerSettings, args, engine_args=args.engine_args)
    return run_worker(settings)


def register(sub: Any) -> None:
    worker = sub.add_parser(
        "worker",
        help="Run one model replica: engine + agent that registers it.",
        description="Run one model replica. Flags after `--` go to the engine, e.g. "
        "`fleetserve worker --served-name m --source /models/m -- --max-num-seqs 64`.",
    )
    add_settings_arguments(worker, WorkerSettings, skip=("engine_args",))
    worker.set_defaults(func=cmd_worker)
