from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetserve.demo_model import DEMO_MODEL_NAME, make_demo_model

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def fleet_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLEETSERVE_HOME of the test session's own (no writes to the user's cache)."""
    return tmp_path_factory.mktemp("fleetserve-home")


@pytest.fixture(scope="session")
def fleet_env(fleet_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLEETSERVE_HOME"] = str(fleet_home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def tiny_model(fleet_home: Path) -> Path:
    """The tiny Llama made locally, where `fleetserve up` looks for its demo model."""
    return make_demo_model(fleet_home / "models" / DEMO_MODEL_NAME)


@pytest.fixture
def log_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = ARTIFACTS / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    yield path


@pytest.fixture(scope="module")
def fast_and_slow(request: pytest.FixtureRequest, fleet_env: dict[str, str]) -> Iterator[Any]:
    """Controller, gateway and two fake models: `fast`, and `slow` at 20 tokens/s (stoppable)."""
    from tests.helpers import LocalCluster

    cluster = LocalCluster(module_log_dir(request.module.__name__.rsplit(".", 1)[-1]), fleet_env)
    try:  # closed even when setting up fails
        cluster.add_worker("fast", "fake")
        cluster.add_worker("slow", "fake", engine_args=("--tokens-per-s", "20"))
        cluster.wait_workers("fast", 1)
        cluster.wait_workers("slow", 1)
        yield cluster
    finally:
        cluster.close()


def module_log_dir(module: str) -> Path:
    path = ARTIFACTS / module
    path.mkdir(parents=True, exist_ok=True)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run where NVML sees the GPUs they ask for (``gpu(count)``), else skip."""
    from workers.inventory import discover_machine

    gpus = len(discover_machine().gpus)
    for item in items:
        marker = item.get_closest_marker("gpu")
        needed = marker.args[0] if marker and marker.args else 1
        if marker and gpus < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} GPU(s); NVML sees {gpus}"))
