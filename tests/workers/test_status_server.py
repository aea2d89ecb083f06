"""The worker agent's status server: what a Kubernetes probe and Prometheus see."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import httpx
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
