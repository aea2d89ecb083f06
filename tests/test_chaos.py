"""Faults under a steady load, with `fake` workers (real processes, real signals).

Bounded in time: each scenario runs a few seconds of load around its faults.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gateway.protocol import ENDPOINTS
from tests.conftest import module_log_dir
from tests.helpers import Component, Load, LocalCluster, wait_until

# 16 tokens: ~0.3 s per request, so faults hit live streams; answers a function of the prompt
SLOW = ("--tokens-per-s", "50", "--vocabulary", "lm")


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str]) -> Iterator[LocalCluster]:
    local = LocalCluster(module_log_dir("test_chaos"), fleet_env)
    for _ in range(3):
        local.add_worker("echo", "fake", engine_args=SLOW)
    local.wait_workers("echo", 3)
    yield local
    local.close()


def _echo_workers(cluster: LocalCluster) -> list[Component]:
    return [
        c for c in cluster.components if c.name.startswith("worker-echo-") and c.proc.poll() is None
    ]


def test_kill_restart_drain_under_load(cluster: LocalCluster) -> None:
    """SIGKILL a worker, restart the controller, drain another, under 16 streaming clients
    (chat and completions): no request fails; the streams that were on the killed worker are
    resumed on the others (as many resumes as streams cut), and each answer is the one the
    same request gets uninterrupted."""
    victim, drained = _echo_workers(cluster)[:2]
    victim_id = _worker_id(victim)
    with Load(
        cluster.gateway_url,
        "echo",
        concurrency=16,
        max_tokens=(8, 24),
        all_stream=True,
        completions=True,
        record=True,
    ) as load:
        load.wait_requests(40)
        kill_started = time.perf_counter()
        victim.kill_tree()
        kill_done = time.perf_counter()  # (the kill landed in between: walking the tree takes time)
        load.wait_requests(40)
        cluster.controller.kill_tree()
        cluster.controller = cluster.start_controller()
        load.wait_requests(40)
        drained.proc.send_signal(signal.SIGTERM)
        assert drained.proc.wait(30) == 0
        load.wait_requests(40)
    result = load.result
    assert result.failed_before_first_chunk == [] and result.failed_mid_stream == []
    metrics = httpx.get(f"{cluster.gateway_url}/metrics", timeout=5).text
    resumed = _sample(metrics, 'fleetserve_gateway_resumes_total{model="echo",outcome="resumed"}')
    cut = _sample(
        metrics, f'fleetserve_gateway_upstream_mid_stream_failures_total{{worker="{victim_id}"}}'
    )
    on_victim = [a for a in load.answers if a.worker == victim_id and a.started < kill_done]
    surely_cut = [
        a for a in on_victim if a.started < kill_started - 0.05 < kill_done + 0.05 < a.ended
    ]
    maybe_cut = [a for a in on_victim if a.ended > kill_started]
    print(
        f"streams cut: {cut:.0f}, resumed: {resumed:.0f}, in flight at the kill: "
        f"{len(surely_cut)} to {len(maybe_cut)}"
    )
    assert resumed == cut and len(surely_cut) <= resumed <= len(maybe_cut) and resumed >= 1
    # every answer that was on the victim when it died is the uninterrupted answer
    for answer in maybe_cut:
        assert answer.text == answer.direct(cluster, "echo", {}, timeout_s=30)
    # put the cluster back to three workers for the next test
    for _ in range(2):
        cluster.add_worker("echo", "fake", engine_args=SLOW)
    cluster.wait_workers("echo", 3)


def _worker_id(worker: Component) -> str:
    """The id a ready worker registered under (its log says; the log may hold earlier runs)."""
    return str(re.findall(r"registered as (\S+)", worker.log())[-1])


def _sample(metrics: str, sample: str) -> float:
    lines = [line for line in metrics.splitlines() if line.startswith(sample + " ")]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_rolling_restart_fails_no_request(cluster: LocalCluster) -> None:
    """Replace every worker of the model, one at a time: start the new one, drain the old."""
    old = _echo_workers(cluster)
    with Load(cluster.gateway_url, "echo", concurrency=6) as load:
        for worker in old:
            cluster.add_worker("echo", "fake", engine_args=SLOW)
            cluster.wait_workers("echo", len(old) + 1, timeout_s=60)
            worker.proc.send_signal(signal.SIGTERM)
            assert worker.proc.wait(30) == 0
            wait_until(
                lambda: len(cluster.worker_ids("echo")) == len(old), 10, "the drained one to go"
            )
            load.wait_requests(10)
    assert load.result.failed_before_first_chunk == [] and load.result.failed_mid_stream == []
    assert load.result.ok > 10 * len(old)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: httpx.Request("POST", "/", json=v).content),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["echo", "nope", ""]) | json_values},
        optional={
            "messages": json_values,
            "prompt": json_values,
            "stream": json_values,
            "max_tokens": st.integers(-5, 50) | json_values,
            "stream_options": json_values,
        },
    ).map(lambda v: httpx.Request("POST", "/", json=v).content),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies, path=st.sampled_from(sorted(ENDPOINTS)))
def test_fuzzed_bodies_never_get_a_500(cluster: LocalCluster, body: bytes, path: str) -> None:
    """Every routed path (the fake engine serves chat, completions and audio: the others are
    the capability error; audio routes get JSON here: 400)."""
    response = httpx.post(cluster.gateway_url + path, content=body, timeout=30)
    assert response.status_code < 500, response.text  # healthy workers: no error is ours
    if response.status_code >= 400:
        error = response.json()["error"]  # OpenAI's envelope, or Anthropic's on /v1/messages
        assert error["message"] and error["type"]


def test_the_api_keeps_to_its_own_openapi_schema(cluster: LocalCluster) -> None:
    """schemathesis draws requests from /openapi.json: no 5xx, every answer as documented."""
    schema = schemathesis.openapi.from_url(f"{cluster.gateway_url}/openapi.json")
    api = "^/(v1/|v2/|tokenize|detokenize|pooling|classify)"  # not /health, /metrics...
    operations = [op.ok() for op in schema.include(path_regex=api).get_all_operations()]
    assert len(operations) == len(ENDPOINTS) + 2  # every routed path, models, models/{model}

    # (schemathesis's own pytest plugin does not run under pytest 9 yet: drive its strategies)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=st.one_of([op.as_strategy() for op in operations]))
    def check(case: Any) -> None:
        # Not "schema-valid data must be accepted": the JSON schema cannot say that strings
        # must be valid Unicode (no lone surrogates), which the gateway's parser requires.
        case.validate_response(case.call(timeout=30), excluded_checks=[positive_data_acceptance])

    check()
