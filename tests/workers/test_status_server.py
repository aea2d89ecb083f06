"""The worker agent's status server: what a Kubernetes probe and Prometheus see."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import module_log_dir
from tests.helpers import Component, LocalCluster, descendants, free_port, wait_until


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str]) -> Iterator[LocalCluster]:
    local = LocalCluster(module_log_dir("test_status_server"), fleet_env)
    try:
        yield local
    finally:
        local.close()


def _status(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def _state(client: openai.OpenAI, model: str) -> object:
    return {m.id: (m.model_extra or {}).get("state") for m in client.models.list()}.get(model)


def _asleep(url: str) -> bool:
    try:
        return _metric(url, "fleetserve_worker_asleep") == 1
    except httpx.HTTPError:  # (its status server is not up yet)
        return False


def _engine_pid(worker: Component) -> int:
    # agent -> reaper -> engine
    return descendants(worker.pid)[-1]


def test_health_follows_the_engine_and_the_drain(cluster: LocalCluster) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = cluster.add_worker("probe", "fake", "--status-port", str(port))
    wait_until(lambda: _status(url) == 200, 60, "the worker's /health to say ready")
    assert cluster.worker_ids("probe"), "ready before the controller routes it"
    assert httpx.get(f"{url}/live", timeout=2).status_code == 200
    assert _metric(url, "fleetserve_worker_ready") == 1
    assert _metric(url, "fleetserve_worker_engine_restarts_total") == 0
    # the engine's own metrics come along on the same scrape
    assert "vllm:num_requests_running" in httpx.get(f"{url}/metrics", timeout=5).text

    os.kill(_engine_pid(worker), signal.SIGKILL)  # the engine crashes
    wait_until(lambda: _status(url) == 503, 10, "/health to say not ready")
    assert httpx.get(f"{url}/live", timeout=2).status_code == 200  # no reason to kill the pod
    wait_until(lambda: _status(url) == 200, 60, "ready again after the restart")
    assert _metric(url, "fleetserve_worker_engine_restarts_total") == 1

    worker.proc.send_signal(signal.SIGTERM)  # a rolling update: out of the Service at once
    wait_until(lambda: _status(url) != 200, 10, "/health to stop saying ready while draining")
    assert worker.proc.wait(timeout=60) == 0


def test_an_idle_engine_sleeps_and_a_held_request_wakes_it(cluster: LocalCluster) -> None:
    """sleep_after_s on the fake engine, which serves vLLM's sleep mode routes as vLLM does
    (vLLM's CPU build refuses sleep mode; tests/workers/test_sleep_gpu.py runs vLLM's on a
    GPU): idle, the worker leaves the routing table and its engine sleeps (the process
    stays); a request is held by the gateway, which tells the controller, whose heartbeat
    reply wakes the engine; the request is answered by the same engine."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = cluster.add_worker("dozy", "fake", "--status-port", str(port), "--sleep-after-s", "1")
    wait_until(lambda: _asleep(url), 60, "the engine asleep")
    (worker_id,) = cluster.worker_ids("dozy", "sleeping")  # out of the routing table
    engine = _engine_pid(worker)
    with cluster.engine(worker_id) as direct:  # as a gateway would reach it: asleep
        hi = {"model": "dozy", "prompt": "hi", "max_tokens": 2}
        assert direct.post("/v1/completions", json=hi).status_code == 503
        assert direct.post("/wake_up").status_code == 403  # the agent's route only
    client = cluster.client().with_options(timeout=60)
    wait_until(lambda: _state(client, "dozy") == "sleeping", 30, "the gateway's table")
    reply = client.completions.create(model="dozy", prompt="hi", max_tokens=2)
    assert reply.choices[0].text == " tok0 tok1"
    # the same engine, woken (not restarted)
    assert _engine_pid(worker) == engine
    assert worker_id in {w.worker_id for w in cluster.table().workers}
    assert _metric(url, "fleetserve_worker_wakes_total") == 1
    assert _metric(url, "fleetserve_worker_engine_restarts_total") == 0
