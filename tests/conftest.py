from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from fleetserve import paths
from workers.vllm.demo_model import DEMO_MODEL_NAME, make_demo_model

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

# Properties, not timings: on a busy 2-core CI machine one example can take longer than
# hypothesis's 200 ms deadline, or its generation look "too slow", through no fault of the code.
settings.register_profile(
    "fleetserve", deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
settings.load_profile("fleetserve")


@pytest.fixture(scope="session")
def fleet_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLEETSERVE_HOME of the test session's own (no writes to the user's models or logs).

    It shares the user's llama.cpp sources and llama-server build (scripts/setup.sh made
    them; building again would take minutes).
    """
    home = tmp_path_factory.mktemp("fleetserve-home")
    shared = paths.llamacpp_dir()
    shared.mkdir(parents=True, exist_ok=True)
    (home / "llama.cpp").symlink_to(shared, target_is_directory=True)
    return home


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


#: The cache's name for the tiny model converted to GGUF: `fleetserve model list` shows it.
GGUF_NAME = f"{DEMO_MODEL_NAME}-f32"


@pytest.fixture(scope="session")
def gguf_f32(fleet_env: dict[str, str], fleet_home: Path, tiny_model: Path) -> Path:
    """The tiny model as an f32 GGUF file in the model cache, by `fleetserve model convert`."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: fleetserve[llamacpp]")
    cmd = [sys.executable, "-m", "fleetserve.cli", "model", "convert", str(tiny_model)]
    cmd += ["--to", "gguf", "--quantize", "f32"]
    done = subprocess.run(cmd, env=fleet_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    path = fleet_home / "models" / f"{GGUF_NAME}.gguf"
    assert f"wrote {path} (f32" in done.stdout
    return path


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
