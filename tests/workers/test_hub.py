"""`fleetserve model pull` against a hub on loopback (tests/workers/fakehub.py) at HF_ENDPOINT.

The real huggingface_hub underneath, in a real `fleetserve` process: progress lines,
a pull killed half way and resumed with a Range request, 401 and 404 ending it at
once with what to do, and a worker refusing a gated model before its engine starts.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.workers.fakehub import FakeHub, HubFile, HubModel, RunningHub, start_hub

WEIGHTS = os.urandom(24 * 2**20)  # over huggingface_hub's 10 MiB write chunk: a kill leaves a part
STALL_AT = 16 * 2**20  # the hub stops sending here until released: the test kills the pull then
CHUNK = 10 * 2**20  # huggingface_hub writes what it downloads in chunks of this size
GATED_TOKEN = "hf_fleetserve_test_token"


#: A LoRA adapter's files as peft saves them (the weights' bytes are not read here).
LORA = [
    HubFile("adapter_config.json", b'{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}'),
    HubFile("adapter_model.safetensors", b"weights", lfs=True),
]


@pytest.fixture(scope="module")
def hub() -> Iterator[RunningHub]:
    files = [
        HubFile("config.json", b'{"architectures": ["LlamaForCausalLM"]}'),
        HubFile("model.safetensors", WEIGHTS, lfs=True),
    ]
    gated = [HubFile("config.json", b"{}")]
    running = start_hub(
        FakeHub(
            {
                "acme/tiny": HubModel("acme/tiny", files),
                "acme/gated": HubModel("acme/gated", gated, token=GATED_TOKEN),
                "acme/lora": HubModel("acme/lora", LORA),
            },
            stall_at={"acme/tiny/model.safetensors": STALL_AT},
        )
    )
    yield running
    running.stop()


def _env(hub: RunningHub, hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {"HF_ENDPOINT": hub.hub.url, "HF_HOME": str(hf_home)} | extra


def _pull(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", "model", "pull", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _repo(hf_home: Path, repo: str) -> Path:
    return hf_home / "hub" / f"models--{repo.replace('/', '--')}"


def test_a_pull_shows_progress_resumes_after_a_kill_and_is_not_repeated(
    hub: RunningHub, tmp_path: Path
) -> None:
    env = _env(hub, tmp_path / "hf")
    blob = _repo(tmp_path / "hf", "acme/tiny") / "blobs" / hashlib.sha256(WEIGHTS).hexdigest()
    partial = blob.with_name(blob.name + ".incomplete")
    out = tmp_path / "first.out"
    cmd = [sys.executable, "-m", "fleetserve.cli", "model", "pull", "acme/tiny"]
    with out.open("w") as sink:
        first = subprocess.Popen(
            [*cmd, "--progress-every-s", "0.2"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    try:
        # What a user watching it sees while the hub stalls at 16 MiB: 10 MiB written so far.
        wait_until(
            lambda: "pulling acme/tiny: 10.0 MiB of 24.0 MiB (42%)" in out.read_text(),
            60,
            "a progress line with the part on disk",
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a preempted node, an OOM kill
        first.wait(10)
    assert out.read_text().splitlines()[0] == "pulling acme/tiny: 24.0 MiB in 2 files"
    assert partial.stat().st_size == CHUNK

    hub.hub.release.set()
    hub.hub.requests.clear()
    second = _pull(env, "acme/tiny")
    assert second.returncode == 0, second.stderr
    assert "resuming from 10.0 MiB" in second.stdout
    assert "24.0 MiB of 24.0 MiB (100%), done" in second.stdout
    (get,) = [r for r in hub.hub.requests if r.method == "GET" and "resolve" in r.path]
    assert get.path.endswith("/model.safetensors") and get.range == f"bytes={CHUNK}-"
    snapshot = Path(second.stdout.splitlines()[-1].split(": ", 1)[1])
    assert hashlib.sha256((snapshot / "model.safetensors").read_bytes()).digest() == (
        hashlib.sha256(WEIGHTS).digest()
    )
    commit = hub.hub.models["acme/tiny"].commit
    assert snapshot.name == commit  # where vLLM looks for the hub id (refs/main -> commit)
    assert (_repo(tmp_path / "hf", "acme/tiny") / "refs" / "main").read_text() == commit

    # Pulled: the next pull transfers nothing, and works offline (what serving pods do).
    hub.hub.requests.clear()
    third = _pull(env, "acme/tiny")
    assert third.returncode == 0 and "every file is in the cache (24.0 MiB)" in third.stdout
    assert not [r for r in hub.hub.requests if r.method == "GET" and "resolve" in r.path]
    offline = _pull(env | {"HF_HUB_OFFLINE": "1"}, "acme/tiny")
    assert offline.returncode == 0 and offline.stdout.strip().endswith(str(snapshot))


def test_a_gated_model_without_a_token_is_refused_at_once_naming_the_fix(
    hub: RunningHub, tmp_path: Path
) -> None:
    hub.hub.requests.clear()
    refused = _pull(_env(hub, tmp_path / "hf"), "acme/gated")
    assert refused.returncode == 1  # the CLI's error exit
    assert "acme/gated is gated: the hub at" in refused.stderr and "answered 401" in refused.stderr
    assert "set HF_TOKEN" in refused.stderr and "fleetserve-hf-token" in refused.stderr
    assert len(hub.hub.requests) == 1  # one answer read, no retries, no download
    allowed = _pull(_env(hub, tmp_path / "hf", HF_TOKEN=GATED_TOKEN), "acme/gated")
    assert allowed.returncode == 0, allowed.stderr
    wrong = _pull(_env(hub, tmp_path / "hf2", HF_TOKEN="hf_wrong"), "acme/gated")
    assert wrong.returncode == 1 and "refuses this token" in wrong.stderr


def test_an_unknown_model_or_revision_is_a_404_said_plainly(
    hub: RunningHub, tmp_path: Path
) -> None:
    missing = _pull(_env(hub, tmp_path / "hf"), "acme/nope")
    assert missing.returncode == 1
    assert "acme/nope: no such model on the hub at" in missing.stderr and "(404)" in missing.stderr
    revision = _pull(_env(hub, tmp_path / "hf"), "acme/tiny", "--revision", "v9")
    assert revision.returncode == 1 and "no such revision" in revision.stderr
    offline = _pull(_env(hub, tmp_path / "hf", HF_HUB_OFFLINE="1"), "acme/tiny")
    assert offline.returncode == 1
    assert "not in the model cache and HF_HUB_OFFLINE" in offline.stderr
    assert "fleetserve model pull acme/tiny" in offline.stderr


def test_a_cluster_files_model_is_pulled_by_name_and_a_local_path_is_left_alone(
    hub: RunningHub, tmp_path: Path
) -> None:
    """What a Kubernetes worker's init container runs: its own model of the file only."""
    env = _env(hub, tmp_path / "hf", HF_TOKEN=GATED_TOKEN)
    local = tmp_path / "weights"
    local.mkdir()
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "models:\n"
        "  - {name: g, engine: vllm, source: acme/gated}\n"
        f"  - {{name: l, engine: vllm, source: {local}}}\n"
        "  - {name: f, engine: fake, source: acme/nope}\n"
    )
    hub.hub.requests.clear()
    pulled = _pull(env, "-f", str(cluster), "--model", "g")
    assert pulled.returncode == 0, pulled.stderr
    assert hub.hub.requests and all("acme/gated/" in r.path for r in hub.hub.requests)
    for name in ("l", "f"):  # a local path is read where it is; the fake engine reads nothing
        alone = _pull(env, "-f", str(cluster), "--model", name)
        assert alone.returncode == 0 and "no model to pull" in alone.stdout, alone.stderr
    path = _pull(env, str(local))
    assert path.returncode == 0 and "not a hub model (org/name): nothing to pull" in path.stdout
    unknown = _pull(env, "-f", str(cluster), "--model", "zz")
    assert unknown.returncode == 1 and "has no model named 'zz'" in unknown.stderr


def test_a_worker_refuses_a_gated_model_before_starting_its_engine(
    hub: RunningHub, tmp_path: Path
) -> None:
    """The engine would fail on 401 at every restart, forever; the worker stops at once."""
    worker = ["worker", "--engine", "vllm", "--source", "acme/gated", "--served-name", "gated"]
    done = subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", *worker, "--controller-url", hub.hub.url],
        env=_env(hub, tmp_path / "hf", FLEETSERVE_HOME=str(tmp_path / "home")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "acme/gated is gated" in done.stderr and "set HF_TOKEN" in done.stderr
    assert "starting vllm engine" not in done.stderr


def test_an_adapter_on_the_hub_is_pulled_and_served_from_the_cache(
    hub: RunningHub, tmp_path: Path
) -> None:
    """A cluster file's adapter given by hub id: `model pull -f` fetches it with its base's
    entry, and what `fleetserve up` (and `adapter add`) serve it from is the cached copy,
    checked loadable."""
    env = _env(hub, tmp_path / "hf")
    base = tmp_path / "weights"  # (a local base: only the adapter is the hub's)
    base.mkdir()
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "models:\n"
        f"  - {{name: b, engine: vllm, source: {base},"
        " adapters: [{name: a, source: acme/lora}]}\n"
    )
    hub.hub.requests.clear()
    assert _pull(env, "-f", str(cluster)).returncode == 0
    assert any("acme/lora/" in r.path for r in hub.hub.requests)
    local = subprocess.run(
        [
            sys.executable,
            "-c",
            "from workers.adapters import inspect_adapter\n"
            "from fleetserve.cli.adapter import local_source\n"
            "path = local_source('acme/lora')\n"
            "print(path, inspect_adapter(path, 16).rank)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert local.returncode == 0, local.stderr
    path, rank = local.stdout.split()
    assert Path(path).is_relative_to(_repo(tmp_path / "hf", "acme/lora")) and rank == "8"
