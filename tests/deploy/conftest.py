from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deploy.skypilot import DEPLOY, LAUNCH_SECRETS, load_tasks

# worker.yaml requires these (`sky launch ... --env CONTROLLER_URL=... --env MODEL=...`).
WORKER_REQUIRED_ENV = {"CONTROLLER_URL": "http://10.0.0.5:8001", "MODEL": "Qwen/Qwen2.5-32B"}


@pytest.fixture(scope="session")
def sky_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sky-home")


@pytest.fixture(scope="session")
def tasks(sky_home: Path) -> dict[str, dict[str, Any]]:
    """Every deploy/*.yaml as SkyPilot parses it (launched with the secrets they ask for), by
    file name."""
    names = ("serve.yaml", "service.yaml", "cluster.yaml")
    parsed = load_tasks([DEPLOY / n for n in names], sky_home, secrets=LAUNCH_SECRETS)
    parsed |= load_tasks([DEPLOY / "worker.yaml"], sky_home, WORKER_REQUIRED_ENV, LAUNCH_SECRETS)
    return parsed
