"""The hot path from worker to client (gateway/proxy.py), in-process: answers streamed back from
the model's own workers, the worker named in a header, retries and cool-down."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.gateway.inproc import GatewayUnderTest, InProcessCluster

pytestmark = pytest.mark.anyio

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


async def test_chat_and_completions_stream_and_not(gateway: GatewayUnderTest) -> None:
    client = gateway.client()
    chat = await client.chat.completions.create(
        model="echo-alias", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert chat.choices[0].message.content == " tok0 tok1 tok2 tok3 tok4"
    pieces = [
        chunk.choices[0].delta.content or ""
        async for chunk in await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
    ]
    assert "".join(pieces) == " tok0 tok1 tok2"
    text = [
        c.choices[0].text
        async for c in await client.completions.create(
            model="other", prompt="x", max_tokens=2, stream=True
        )
    ]
    assert text == [" tok0", " tok1"]


async def test_requests_reach_only_their_models_workers_and_spread(
    gateway: GatewayUnderTest, cluster: InProcessCluster
) -> None:
    echo_ids, other_ids = await cluster.worker_ids("echo"), await cluster.worker_ids("other")
    client = gateway.client()
    served: dict[str, list[str]] = {"echo": [], "other": []}
    for i in range(30):
        model = "echo" if i % 3 else "other"
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        served[model].append(raw.headers["x-fleetserve-worker"])
    assert set(served["echo"]) == echo_ids  # both echo workers used, nothing else
    assert set(served["other"]) == other_ids


@pytest.mark.parametrize("stream", [False, True])
async def test_the_worker_header_names_the_worker_that_answered(
    cluster: InProcessCluster, gateway: GatewayUnderTest, stream: bool
) -> None:
    async with cluster.model("solo") as solo:
        (worker_id,) = solo.ids
        engine = solo.engines[worker_id]
        raw = await gateway.client().completions.with_raw_response.create(
            model="solo", prompt="x", max_tokens=2, stream=stream
        )
        assert raw.headers["x-fleetserve-worker"] == worker_id
        assert raw.headers["content-type"].startswith(
            "text/event-stream" if stream else "application/json"
        )
        assert engine.finished == 1  # its engine generated the answer


async def test_a_worker_refusing_connections_is_retried_on_another(
    cluster: InProcessCluster,
) -> None:
    """Round robin sends one of the first two requests to the dead worker: it is retried on
    the live one, and the dead one is not tried again while it cools down."""
    async with (
        cluster.model("mixed", 1, dead=1, routing_policy="round_robin") as mixed,
        cluster.gateway() as gateway,
    ):
        (live,), (dead,) = mixed.ids, mixed.dead
        client = gateway.client()
        for i in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model="mixed",
                messages=HI,
                max_tokens=2,
                stream=i % 2 == 1,
            )
            assert raw.headers["x-fleetserve-worker"] == live
        assert mixed.engines[live].finished == 4
        assert await gateway.metric("fleetserve_gateway_retries_total", model="mixed") == 1
        failures = "fleetserve_gateway_upstream_failures_total"
        assert await gateway.metric(failures, worker=dead) == 1


async def test_only_a_dead_worker_is_502_then_503_while_it_cools_down(
    cluster: InProcessCluster,
) -> None:
    async with cluster.model("ghost", 0, dead=1) as ghost, cluster.gateway() as gateway:
        client = gateway.client()
        answers = []
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as failed:
                await client.chat.completions.create(model="ghost", messages=HI)
            answers.append((failed.value.status_code, failed.value.code))
        assert answers == [(502, "upstream_error"), (503, "no_healthy_worker")]
        assert await gateway.metric("fleetserve_gateway_retries_total", model="ghost") == 0
        failures = "fleetserve_gateway_upstream_failures_total"
        assert await gateway.metric(failures, worker=ghost.dead[0]) == 1


async def test_a_draining_worker_gets_no_new_requests(
    cluster: InProcessCluster, gateway: GatewayUnderTest
) -> None:
    async with cluster.model("leaving", 2) as leaving:
        staying, going = leaving.ids
        (await cluster.http.post(f"/workers/{going}/drain")).raise_for_status()
        await cluster.settle()
        client = gateway.client()
        for _ in range(6):
            raw = await client.chat.completions.with_raw_response.create(
                model="leaving",
                messages=HI,
                max_tokens=1,
            )
            assert raw.headers["x-fleetserve-worker"] == staying
        (await cluster.http.post(f"/workers/{staying}/drain")).raise_for_status()
        await cluster.settle()
        with pytest.raises(openai.InternalServerError) as none_left:
            await client.chat.completions.create(model="leaving", messages=HI)
        assert (none_left.value.status_code, none_left.value.code) == (503, "no_healthy_worker")
        assert leaving.engines[going].finished == 0
