"""Load SkyPilot task YAMLs with SkyPilot's own parser; print what it understood, as JSON.

Runs under .venv-sky's Python (skypilot's pins clash with fleetserve's, see
scripts/setup.sh), so it imports nothing from fleetserve:

    .venv-sky/bin/python tests/deploy/sky_load.py deploy/worker.yaml --env MODEL=m --secret K=V

Without ``--env`` or ``--secret`` a file goes through ``sky.Task.from_yaml``; with them,
through the loader `sky launch --env --secret` uses. A file SkyPilot rejects exits 1 with
SkyPilot's message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _summary(task: Any) -> dict[str, Any]:
    service = task.service
    return {
        "name": task.name,
        "num_nodes": task.num_nodes,
        "workdir": task.workdir,
        "envs": dict(task.envs),
        "secrets": {k: v.get_secret_value() for k, v in task.secrets.items()},
        "setup": task.setup,
        "run": task.run,
        # An ordered `accelerators` list becomes one Resources per choice, in order.
        "resources": [
            {
                "accelerators": r.accelerators,
                "use_spot": r.use_spot,
                "ports": r.ports,
                "disk_size": r.disk_size,
                "network_tier": r.network_tier.value if r.network_tier else None,
            }
            for r in (task.resources if isinstance(task.resources, list) else list(task.resources))
        ],
        "service": service.to_yaml_config() if service is not None else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE, as sky launch")
    parser.add_argument("--secret", action="append", default=[], help="NAME=VALUE, as sky launch")
    args = parser.parse_args()

    import sky
    from sky.utils import dag_utils

    overrides = [tuple(item.split("=", 1)) for item in args.env]
    secrets = [tuple(item.split("=", 1)) for item in args.secret]
    out = {}
    for path in args.paths:
        try:
            if overrides or secrets:
                dag = dag_utils.load_chain_dag_from_yaml(
                    path, env_overrides=overrides or None, secret_overrides=secrets or None
                )
                (task,) = dag.tasks
            else:
                task = sky.Task.from_yaml(path)
        except Exception as exc:  # SkyPilot's own message is what the caller wants to see
            print(f"{path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        out[path] = _summary(task)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
