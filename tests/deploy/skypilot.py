"""What the deploy tests need from SkyPilot: its parser, and the environment it gives a job.

SkyPilot lives in .venv-sky (scripts/setup.sh --dev), apart from fleetserve's
venv because its pins clash with fleetserve's; it is called as a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import alive, descendants, wait_until

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SKY_PYTHON = REPO / ".venv-sky" / "bin" / "python"
SKY_LOAD = Path(__file__).with_name("sky_load.py")
YAMLS = ("serve.yaml", "service.yaml", "cluster.yaml", "worker.yaml")
# What a user gives `sky launch --secret NAME` (read from the shell): the endpoints' API key
# and the cluster token of the YAMLs that span machines.
LAUNCH_SECRETS = {
    "API_KEY": "sk-deploy-test-0123456789abcdef",
    "FLEETSERVE_CLUSTER_TOKEN": "deploy-test-cluster-token-0123456789abcdef",
}


def load_tasks(
    paths: list[Path],
    home: Path,
    env: dict[str, str] | None = None,
    secrets: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each YAML as SkyPilot parses it (see sky_load.py), keyed by file name; ``env`` and
    ``secrets`` as `sky launch --env NAME=VALUE --secret NAME=VALUE` give them.

    Fails with SkyPilot's own message when SkyPilot rejects a file.
    """
    assert SKY_PYTHON.exists(), f"no SkyPilot at {SKY_PYTHON}: run scripts/setup.sh --dev"
    cmd = [str(SKY_PYTHON), str(SKY_LOAD), *map(str, paths)]
    for name, value in (env or {}).items():
        cmd += ["--env", f"{name}={value}"]
    for name, value in (secrets or {}).items():
        cmd += ["--secret", f"{name}={value}"]
    # SkyPilot keeps its state under ~/.sky: a home of the test session's own.
    sky_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    sky_env["HOME"] = str(home)
    done = subprocess.run(cmd, env=sky_env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"SkyPilot rejected the YAML:\n{done.stderr.strip()}")
    return {Path(path).name: task for path, task in json.loads(done.stdout).items()}


def skypilot_env(
    task: dict[str, Any],
    base: dict[str, str],
    *,
    rank: int = 0,
    ips: tuple[str, ...] = ("127.0.0.1",),
    gpus: int = 0,
    **overrides: str,
) -> dict[str, str]:
    """The environment SkyPilot gives ``setup`` and ``run`` on node ``rank``.

    The task's envs and secrets (as `--env NAME=VALUE` would override them),
    and the SKYPILOT_* variables of a cluster of ``len(ips)`` nodes with
    ``gpus`` GPUs each.
    """
    env = {**base, **task["envs"], **task["secrets"], **overrides}
    node_ips = "\n".join(ips)  # SkyPilot separates them with newlines
    env.update(
        SKYPILOT_NODE_RANK=str(rank),
        SKYPILOT_NODE_IPS=node_ips,
        SKYPILOT_NUM_NODES=str(len(ips)),
        SKYPILOT_NUM_GPUS_PER_NODE=str(gpus),
        SKYPILOT_SETUP_NODE_RANK=str(rank),
        SKYPILOT_SETUP_NODE_IPS=node_ips,
        SKYPILOT_TASK_ID=f"sky-test_{task['name']}_1",
        SKYPILOT_CLUSTER_INFO=json.dumps(
            {"cluster_name": "test", "cloud": "local", "region": "loopback", "zone": None}
        ),
    )
    return env


class NodeJob:
    """One node's `run` script, started as SkyPilot starts it: bash in the workdir, own group."""

    def __init__(self, name: str, script: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.out"
        with self.log_path.open("wb") as sink:
            self.proc = subprocess.Popen(
                ["bash", "-c", script],
                cwd=REPO,  # the synced workdir
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                process_group=0,  # own group, same session: see fleetserve.procs
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_running(self) -> None:
        assert self.proc.poll() is None, (
            f"{self.name}'s run script exited ({self.proc.returncode}):\n{self.output()[-4000:]}"
        )

    def stop(self, timeout_s: float = 90) -> int:
        """SIGTERM the job's process group, as `sky cancel` does; nothing may outlive it."""
        tree = [self.proc.pid, *descendants(self.proc.pid)]
        try:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            code = self.proc.wait(timeout_s)
            wait_until(
                lambda: not [pid for pid in tree if alive(pid)],
                30,
                f"every process of {self.name} to exit",
            )
            return code
        finally:
            for pid in [self.proc.pid, *tree]:  # a failed test must not leave engines behind
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


def gateway_models(gateway_url: str) -> set[str]:
    try:
        return set(httpx.get(f"{gateway_url}/health", timeout=2).json()["models"])
    except (httpx.HTTPError, ValueError, KeyError):
        return set()


def wait_routed(job: NodeJob, gateway_url: str, model: str, timeout_s: float) -> None:
    """Wait until the gateway routes ``model``, failing at once if the job died."""

    def routed() -> bool:
        job.check_running()
        return model in gateway_models(gateway_url)

    wait_until(routed, timeout_s, f"the gateway at {gateway_url} to route {model}", 0.5)
