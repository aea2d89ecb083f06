"""A real Prometheus (deploy/prometheus/prometheus.yml) scraping a running cluster.

Controller, two gateways (one with API keys), two `fake` CPU workers with their
agents' status servers; traffic with the `openai` client, a worker that fails
before the first byte, an engine killed mid-stream. Then Prometheus's HTTP API
must show the series with the values the traffic implies.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import yaml

from controller.protocol import DeclaredModel
from fleetserve.protocol import Registration
from gateway.auth import hash_key
from tests.conftest import module_log_dir
from tests.deploy.prometheus import Prometheus
from tests.deploy.test_prometheus_rules import (
    dashboard_queries,
    metric_names,
    rule_queries,
)
from tests.helpers import LocalCluster, descendants, free_port, wait_until

TOKENS_PER_S = 200.0  # the fake engine's pace: sets what time per output token must read
RESUMED_TOKENS = 1000  # the stream whose engine is killed after its first chunk
KEY = "sk-test-prometheus"


@dataclass
class Traffic:
    """What the client saw."""

    ok: int = 0
    streams: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ghost_id: str = ""
    killed_worker: str = ""
    resumed_streams: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Setup:
    cluster: LocalCluster
    prometheus: Prometheus
    traffic: Traffic
    worker_status: dict[str, str]


def _send_traffic(url: str, cluster: LocalCluster, traffic: Traffic) -> None:
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)
    messages: Any = [{"role": "user", "content": "how are you today"}]

    def one(stream: bool, max_tokens: int = 16) -> None:
        if stream:
            usage = None
            chunks = client.chat.completions.create(
                model="echo",
                messages=messages,
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in chunks:
                usage = chunk.usage or usage
            traffic.streams += 1
        else:
            usage = client.chat.completions.create(
                model="echo", messages=messages, max_tokens=max_tokens
            ).usage
        assert usage is not None
        traffic.prompt_tokens += usage.prompt_tokens
        traffic.completion_tokens += usage.completion_tokens
        traffic.ok += 1

    for i in range(20):
        one(stream=i % 2 == 0, max_tokens=8 + i)
    # Streams that do not ask for usage get none, as without a gateway, yet are counted:
    # the gateway asked the engine for it and took it out again.
    prompt_tokens = traffic.prompt_tokens // traffic.ok  # the same messages every time
    for max_tokens in (5, 9):
        chunks = list(
            client.chat.completions.create(
                model="echo", messages=messages, max_tokens=max_tokens, stream=True
            )
        )
        assert not any(chunk.usage for chunk in chunks)
        tokens = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
        assert tokens == max_tokens  # the fake engine sends one token per chunk
        traffic.completion_tokens += tokens
        traffic.prompt_tokens += prompt_tokens
        traffic.streams += 1
        traffic.ok += 1
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)

    # A worker that is registered but refuses connections: the gateway retries elsewhere.
    ghost = Registration(
        worker_id="ghost-1",
        model_names=["echo"],
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        engine="fake",
        capacity=8,
    )
    traffic.ghost_id = ghost.worker_id
    gateway_metrics = url.removesuffix("/v1") + "/metrics"

    def ghost_failed() -> bool:
        # (again each time: it sends no heartbeats, and must not expire before it is tried)
        body = ghost.model_dump(mode="json")
        httpx.post(f"{cluster.controller_url}/workers/register", json=body).raise_for_status()
        one(stream=False)  # every one succeeds: the client never sees the ghost
        return 'worker="ghost-1"' in httpx.get(gateway_metrics).text

    wait_until(ghost_failed, 30, "the gateway to try the ghost worker", every_s=0)
    httpx.delete(f"{cluster.controller_url}/workers/{ghost.worker_id}")

    # An engine killed while it streams: the other worker takes the stream over (resume), the
    # client reads one whole answer; the agent restarts the engine.
    chunks = client.chat.completions.create(
        model="echo",
        messages=messages,
        max_tokens=RESUMED_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = next(iter(chunks))
    assert first.choices
    response = chunks.response
    traffic.killed_worker = response.headers["x-fleetserve-worker"]
    worker = next(  # its agent logged its id
        c
        for c in cluster.components
        if c.name.startswith("worker-") and traffic.killed_worker in c.log()
    )
    os.kill(descendants(worker.pid)[-1], signal.SIGKILL)  # agent -> reaper -> engine
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == RESUMED_TOKENS
    traffic.prompt_tokens += usage.prompt_tokens
    traffic.completion_tokens += usage.completion_tokens
    traffic.ok += 1
    traffic.streams += 1
    traffic.resumed_streams += 1


@pytest.fixture(scope="module")
def setup(fleet_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    log_dir = module_log_dir("test_prometheus_scrape")
    tmp = tmp_path_factory.mktemp("prometheus")
    cluster = LocalCluster(log_dir, fleet_env)
    prometheus: Prometheus | None = None
    try:
        status_ports = [free_port(), free_port()]
        for port in status_ports:
            cluster.add_worker(
                "echo",
                "fake",
                "--status-port",
                str(port),
                engine_args=("--tokens-per-s", str(TOKENS_PER_S)),
            )
        cluster.wait_workers("echo", 2)
        cluster.declare(DeclaredModel(name="echo", replicas=2))  # as `fleetserve up` does
        keys = tmp / "keys.yaml"
        keys.write_text(yaml.safe_dump({"keys": [{"name": "team-a", "key_sha256": hash_key(KEY)}]}))
        with cluster.extra_gateway("gateway-keys", "--keys-file", str(keys)) as (_, url):
            gateway_hosts = [
                cluster.gateway_url.removeprefix("http://"),
                url.removeprefix("http://").removesuffix("/v1"),
            ]
            worker_hosts = [f"127.0.0.1:{port}" for port in status_ports]
            prometheus = Prometheus(
                tmp,
                log_dir,
                {
                    "gateways.json": gateway_hosts,
                    "controller.json": [cluster.controller_url.removeprefix("http://")],
                    "workers.json": worker_hosts,
                },
            )
            traffic = Traffic()
            _send_traffic(url, cluster, traffic)
            # the killed engine is back: both workers ready again
            wait_until(
                lambda: all(_get(f"http://{host}/health") == 200 for host in worker_hosts),
                30,
                "both workers to be ready again",
            )
            ids = {
                host: json.loads(httpx.get(f"http://{host}/health").text)["worker_id"]
                for host in worker_hosts
            }
            yield Setup(cluster, prometheus, traffic, ids)
    finally:
        if prometheus is not None:
            prometheus.close()
        cluster.close()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def query(setup: Setup, expr: str) -> list[dict[str, Any]]:
    return setup.prometheus.query(expr)


def value(setup: Setup, expr: str) -> float | None:
    return setup.prometheus.value(expr)


def eventually(setup: Setup, expr: str, expected: float, timeout_s: float = 60) -> None:
    setup.prometheus.eventually(expr, expected, timeout_s)


def test_every_target_is_up(setup: Setup) -> None:
    eventually(setup, "count(up == 1)", 5)  # 2 gateways, 1 controller, 2 worker agents


def test_gateway_counts_requests_by_model_status_and_key(setup: Setup) -> None:
    t = setup.traffic
    requests = "fleetserve_gateway_requests_total"
    eventually(setup, f'sum({requests}{{model="echo",status="200",key="team-a"}})', t.ok)
    eventually(setup, f'sum({requests}{{model="unknown",status="404",key="team-a"}})', 1)
    # the names clients made up never become label values
    assert query(setup, f'{requests}{{model="nope"}}') == []


def test_gateway_counts_the_tokens_the_client_was_told(setup: Setup) -> None:
    t = setup.traffic
    eventually(setup, 'sum(fleetserve_gateway_prompt_tokens_total{key="team-a"})', t.prompt_tokens)
    # the resumed stream's: the whole answer's, as its usage told the client
    eventually(
        setup,
        'sum(fleetserve_gateway_completion_tokens_total{key="team-a"})',
        t.completion_tokens,
    )


def test_latency_histograms_split_gateway_time_from_engine_time(setup: Setup) -> None:
    t = setup.traffic
    eventually(
        setup,
        'sum(fleetserve_gateway_time_to_first_token_seconds_count{model="echo"})',
        t.streams,
    )
    eventually(
        setup,
        'sum(fleetserve_gateway_request_duration_seconds_count{model="echo"})',
        t.ok,
    )

    def mean(metric: str) -> float:
        total = value(setup, f'sum({metric}_sum{{model="echo"}})')
        count = value(setup, f'sum({metric}_count{{model="echo"}})')
        assert total is not None and count, metric
        return total / count

    tpot = mean("fleetserve_gateway_time_per_output_token_seconds")
    # the fake engine sleeps 1/TOKENS_PER_S between tokens; a loaded machine sleeps longer
    assert 1 / TOKENS_PER_S * 0.8 <= tpot <= 1 / TOKENS_PER_S * 10, tpot
    added = mean("fleetserve_gateway_added_seconds")
    ttft = mean("fleetserve_gateway_time_to_first_token_seconds")
    duration = mean("fleetserve_gateway_request_duration_seconds")
    assert 0 < added < ttft, (added, ttft)  # the gateway's part of the first token's wait
    assert ttft < duration

    def quantile(q: float, metric: str) -> float:
        query = f'histogram_quantile({q}, sum by (le) ({metric}_bucket{{model="echo"}}))'
        result = value(setup, query)
        assert result is not None and result > 0, query
        return result

    # Medians, not means: one stall of a busy machine must not move them.
    # Loopback, idle engines: the gateway takes well under 50 ms.
    assert quantile(0.5, "fleetserve_gateway_added_seconds") < 0.05
    ttft_seconds = "fleetserve_gateway_time_to_first_token_seconds"
    assert quantile(0.5, ttft_seconds) < 5
    assert quantile(0.99, ttft_seconds) >= quantile(0.5, ttft_seconds)


def test_retries_and_upstream_failures_by_worker(setup: Setup) -> None:
    t = setup.traffic
    failures = value(
        setup, f'sum(fleetserve_gateway_upstream_failures_total{{worker="{t.ghost_id}"}})'
    )
    assert failures is not None and failures >= 1
    retries = value(setup, 'sum(fleetserve_gateway_retries_total{model="echo"})')
    assert retries is not None and retries >= failures
    eventually(
        setup,
        f'sum(fleetserve_gateway_upstream_mid_stream_failures_total{{worker="{t.killed_worker}"}})',
        t.resumed_streams,
    )
    eventually(
        setup,
        'sum(fleetserve_gateway_resumes_total{model="echo",outcome="resumed"})',
        t.resumed_streams,
    )
    eventually(setup, "sum(fleetserve_gateway_in_flight_requests)", 0)


def test_controller_reports_workers_and_registrations(setup: Setup) -> None:
    eventually(setup, 'fleetserve_controller_workers{model="echo",state="ready"}', 2)
    # two workers, the ghost, the restarted engine's worker again
    registrations = value(setup, 'fleetserve_controller_registrations_total{model="echo"}')
    assert registrations is not None and registrations >= 4
    heartbeats = value(setup, 'fleetserve_controller_heartbeats_total{model="echo"}')
    assert heartbeats is not None and heartbeats > 0
    missed = value(setup, 'fleetserve_controller_heartbeats_missed_total{model="echo"}')
    assert missed is not None  # the ghost never beat, but was deleted before it missed many
    kv = query(setup, 'fleetserve_controller_worker_kv_cache_usage_ratio{model="echo"}')
    assert {row["metric"]["worker"] for row in kv} == set(setup.worker_status.values())


def test_workers_report_restarts_readiness_and_the_engines_metrics(setup: Setup) -> None:
    t = setup.traffic
    for worker_id in setup.worker_status.values():
        restarts = 1 if worker_id == t.killed_worker else 0
        eventually(
            setup,
            f'fleetserve_worker_engine_restarts_total{{worker="{worker_id}"}}',
            restarts,
        )
        eventually(setup, f'fleetserve_worker_ready{{worker="{worker_id}"}}', 1)
    # the engines' own metrics, re-exported by each agent
    eventually(setup, 'count(vllm:num_requests_running{job="fleetserve-worker"})', 2)


def test_every_metric_the_alerts_and_dashboard_read_exists(setup: Setup) -> None:
    eventually(setup, 'fleetserve_controller_workers{model="echo",state="ready"}', 2)
    missing = [
        name
        for name in sorted(metric_names(rule_queries() + dashboard_queries()))
        if not query(setup, f"count({name})")
    ]
    assert missing == [], f"alerts or dashboard panels read metrics nobody exports: {missing}"
