"""The issue's acceptance run: two vLLM-CPU workers of one model and a fake worker of
another behind one gateway, driven with the `openai` client; faults injected for real.

vLLM's CPU build runs the tiny locally made Llama; on a GPU machine the same code
runs the CUDA build (nothing here is mocked).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import module_log_dir
from tests.helpers import (
    Answer,
    Component,
    Load,
    LocalCluster,
    alive,
    assert_engine_refuses_everyone_but_gateways,
    drain_under_load,
    wait_until,
)

pytestmark = pytest.mark.vllm

MODEL = "tiny-llama"
FAKE = "fake-model"


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str], tiny_model: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(module_log_dir("test_cluster_vllm"), fleet_env)
    for core in range(2):
        _add_vllm_worker(local, tiny_model, core)
    local.add_worker(FAKE, "fake", engine_args=("--tokens-per-s", "100"))
    try:
        local.wait_workers(MODEL, 2, timeout_s=300)
        local.wait_workers(FAKE, 1)
        yield local
    finally:
        local.close()


#: The core each vLLM worker's engine is bound to, by component name.
_CORES: dict[str, int] = {}


def _add_vllm_worker(cluster: LocalCluster, model: Path, core: int) -> None:
    # One core per engine, as `fleetserve up` places CPU replicas: two engines whose
    # OpenMP threads share both cores stall each other for seconds at a time.
    core %= len(os.sched_getaffinity(0))
    env = {"VLLM_CPU_OMP_THREADS_BIND": str(core)}
    worker = cluster.add_worker(MODEL, "vllm", "--source", str(model), "--alias", "tiny", env=env)
    _CORES[worker.name] = core


def _free_core(cluster: LocalCluster) -> int:
    """The core no live vLLM worker's engine is bound to (a killed worker's)."""
    taken = {_CORES[c.name] for c in cluster.components if c.name in _CORES and c.alive()}
    return next(core for core in range(2) if core not in taken)


def _chat(
    client: openai.OpenAI, model: str, stream: bool = False, max_tokens: int = 8
) -> tuple[str, str]:
    """(text, worker id) of one chat completion."""
    messages = [{"role": "user", "content": "hello there"}]
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            stream=True,  # type: ignore[arg-type]
        ) as response:
            worker = response.headers["x-fleetserve-worker"]
            text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        return text, worker
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,  # type: ignore[arg-type]
    )
    return raw.parse().choices[0].message.content or "", raw.headers["x-fleetserve-worker"]


def test_greedy_answer_is_the_engines_own(cluster: LocalCluster) -> None:
    """The gateway passes the engine's answer through unchanged (compare with a direct call)."""
    (worker,) = [w for w in cluster.routes().workers if w.worker_id in cluster.worker_ids(MODEL)][
        :1
    ]
    # straight to the engine, with its secret (as the gateway reaches it)
    direct = openai.OpenAI(base_url=worker.base_url, api_key=worker.engine_secret, max_retries=0)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    expected = direct.chat.completions.create(model=MODEL, **body).choices[0].message.content  # type: ignore[call-overload]
    got = cluster.client().chat.completions.create(model="tiny", **body).choices[0].message.content  # type: ignore[call-overload]
    assert got == expected and got


def test_the_engine_refuses_every_route_around_the_gateway(cluster: LocalCluster) -> None:
    """The red team's check (tests/test_security.py) on a vLLM engine: its --api-key alone
    leaves /invocations, /tokenize, /pooling, /metrics... open; behind the relay nothing is."""
    for worker_id in cluster.worker_ids(MODEL):
        assert_engine_refuses_everyone_but_gateways(cluster, worker_id)


def test_requests_for_each_name_reach_only_that_models_workers(cluster: LocalCluster) -> None:
    vllm_ids, fake_ids = cluster.worker_ids(MODEL), cluster.worker_ids(FAKE)
    client = cluster.client()
    seen: dict[str, set[str]] = {MODEL: set(), FAKE: set()}
    for i in range(16):
        model = MODEL if i % 2 else FAKE
        text, worker = _chat(client, model, stream=i % 4 < 2)
        assert text
        seen[model].add(worker)
    assert seen[FAKE] == fake_ids
    assert seen[MODEL] <= vllm_ids


def test_load_spreads_over_both_vllm_workers(cluster: LocalCluster) -> None:
    with Load(cluster.gateway_url, MODEL, concurrency=4) as load:
        load.wait_requests(40, timeout_s=120)
    result = load.result
    assert not result.failed_before_first_chunk and not result.failed_mid_stream
    assert set(result.workers) == cluster.worker_ids(MODEL)
    # Least load sends more to whichever engine the shared cores make faster, but both serve.
    share = min(result.workers.values()) / result.ok
    assert share > 0.1, f"one worker got only {share:.0%} of the load: {result.workers}"


def test_errors_have_the_right_status_and_openai_body(cluster: LocalCluster) -> None:
    client = cluster.client()
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert unknown.value.status_code == 404
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]
    url = f"{cluster.gateway_url}/v1/chat/completions"
    malformed = httpx.post(
        url,
        content=b'{"model": "tiny-llama", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert (
        malformed.status_code == 400
        and malformed.json()["error"]["type"] == "invalid_request_error"
    )
    missing = httpx.post(
        url, json={"model": MODEL, "max_tokens": 4}
    )  # the SDK would refuse to send it
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "messages"
    assert missing.json()["error"]["code"] == "missing_required_parameter"


def _engine_metric(cluster: LocalCluster, worker_id: str, name: str, label: str = "") -> float:
    with cluster.engine(worker_id) as engine:
        text = engine.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and label in line
    )


def test_client_disconnect_aborts_the_generation_in_the_engine(cluster: LocalCluster) -> None:
    workers = [w.worker_id for w in cluster.table().workers if MODEL in w.model_names]
    generated = "vllm:generation_tokens_total"
    before = {wid: _engine_metric(cluster, wid, generated) for wid in workers}
    max_tokens = 8000  # ~17 s of generation here: longer than any stall of a busy machine
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "write a long story"}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,  # vLLM's sampling option: without a disconnect, all of them come
    }
    with httpx.stream("POST", f"{cluster.gateway_url}/v1/chat/completions", json=body) as response:
        worker = response.headers["x-fleetserve-worker"]
        chunks = response.iter_bytes()
        for _ in range(3):
            assert next(chunks)
    # The client hung up after a few tokens: the engine must stop generating. (vLLM does not
    # count such aborts in request_success_total; the tokens it generated tell.)
    wait_until(
        lambda: _engine_metric(cluster, worker, "vllm:num_requests_running") == 0,
        30,
        "the request to end",
    )
    # a few tokens may come out while the disconnect travels; not all of them
    produced = _engine_metric(cluster, worker, generated) - before[worker]
    print(f"tokens generated before the abort: {produced:.0f} of {max_tokens}")
    assert produced < max_tokens


def test_controller_restart_fails_no_request(cluster: LocalCluster) -> None:
    before = cluster.worker_ids(MODEL) | cluster.worker_ids(FAKE)
    with Load(cluster.gateway_url, MODEL, concurrency=4) as load:
        load.wait_requests(10)
        cluster.controller.kill_tree()
        load.wait_requests(10)
        cluster.controller = cluster.start_controller()
        wait_until(
            lambda: cluster.worker_ids(MODEL) | cluster.worker_ids(FAKE) == before,
            60,  # a heartbeat or two; generous for a busy machine (waiting costs nothing)
            "re-registration",
        )
        load.wait_requests(10)
    assert not load.result.failed_before_first_chunk and not load.result.failed_mid_stream


GREEDY = {"temperature": 0, "ignore_eos": True}


def _worker(cluster: LocalCluster, worker_id: str) -> Component:
    """The component of a ready worker (its log names the id it registered under)."""
    return next(
        c
        for c in cluster.components
        if c.name.startswith(f"worker-{MODEL}-")
        and c.alive()
        and f"registered as {worker_id}" in c.log()
    )


def _wait_replaced(cluster: LocalCluster, dead: str) -> None:
    """Until the dead worker expired and two workers are ready and routed again."""
    wait_until(
        lambda: dead not in (ready := cluster.worker_ids(MODEL)) and len(ready) == 2,
        300,
        f"{dead} replaced",
    )
    cluster.wait_workers(MODEL, 2)


def _cut_probe(
    cluster: LocalCluster, kind: str, max_tokens: int, cut_after: int, killed: list[int]
) -> Answer:
    """A greedy stream of its own whose worker is SIGKILLed (its whole process tree) after
    ``cut_after`` chunks, read to its end (``started``: when the kill was); the processes
    killed are added to ``killed``."""
    prompt = f"a {kind} probe cut after {cut_after} chunks"
    answer = Answer(kind, prompt, max_tokens, "", "", time.perf_counter(), 0.0)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = {**answer.body(MODEL, GREEDY), "stream": True}
    with httpx.stream("POST", cluster.gateway_url + path, json=body, timeout=120) as response:
        answer.worker = response.headers["x-fleetserve-worker"]
        pieces = []
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            choice = event["choices"][0]
            pieces.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
            if len(pieces) == cut_after:
                answer.started = time.perf_counter()  # when the kill was (for the load's)
                killed += _worker(cluster, answer.worker).kill_tree()
    answer.text, answer.ended = "".join(pieces), time.perf_counter()
    return answer


def test_sigkill_under_streaming_load_fails_nothing_and_every_answer_is_exact(
    cluster: LocalCluster, tiny_model: Path
) -> None:
    """Streaming clients (chat and completions, greedy) on both vLLM workers; the worker of a
    long chat stream is SIGKILLed (its whole process tree) after 3 of its chunks, a
    replacement starts, then the worker of a long completion after 240 of 320: no request
    fails, and every stream that was on a killed worker (each probe, and the load's) carries
    the same text as the same request run uninterrupted, directly on an engine."""
    with Load(
        cluster.gateway_url,
        MODEL,
        concurrency=6,
        max_tokens=(24, 96),
        all_stream=True,
        completions=True,
        extra=GREEDY,
        record=True,
    ) as load:
        load.wait_requests(6, timeout_s=120)
        killed: list[int] = []
        early = _cut_probe(cluster, "chat", max_tokens=200, cut_after=3, killed=killed)
        load.wait_requests(3, timeout_s=120)
        _add_vllm_worker(cluster, tiny_model, core=_free_core(cluster))
        _wait_replaced(cluster, early.worker)
        load.wait_requests(3, timeout_s=120)
        late = _cut_probe(cluster, "completion", max_tokens=320, cut_after=240, killed=killed)
        load.wait_requests(6, timeout_s=120)
    assert load.result.failed_before_first_chunk == [] and load.result.failed_mid_stream == []
    wait_until(lambda: not [pid for pid in killed if alive(pid)], 30, "the killed to be gone")
    wait_until(lambda: late.worker not in cluster.worker_ids(MODEL), 30, "the dead to expire")
    cut = [
        a
        for a in load.answers
        for probe in (early, late)
        if a.worker == probe.worker and a.started < probe.started < a.ended
    ]
    print(f"{len(load.answers)} answers; cut by the kills: the 2 probes and {len(cut)} more")
    for answer in (early, late, *cut):
        expected = answer.direct(cluster, MODEL, GREEDY, timeout_s=120)
        assert answer.text == expected, f"{answer.kind} of {answer.max_tokens} tokens differs"
    metrics = httpx.get(f"{cluster.gateway_url}/metrics", timeout=5).text
    resumed = f'fleetserve_gateway_resumes_total{{model="{MODEL}",outcome="resumed"}}'
    assert any(line.startswith(resumed + " ") for line in metrics.splitlines())


def test_sigterm_drains_a_worker_with_zero_failed_requests(
    cluster: LocalCluster, tiny_model: Path
) -> None:
    _add_vllm_worker(cluster, tiny_model, core=_free_core(cluster))  # replace the killed one
    cluster.wait_workers(MODEL, 2, timeout_s=300)
    result = drain_under_load(
        cluster, MODEL, concurrency=6, max_tokens=32, before=12, after=12, timeout_s=120
    )
    assert result.failed_before_first_chunk == [] and result.failed_mid_stream == []
