"""Declared models (the controller knows they should exist) with no ready worker, in-process:
gateways list them, hold their requests until a worker is ready and answer them then, or
503 with Retry-After and why past the hold's bound, in each API's own error format; an
unknown name is still 404; fallbacks apply after the hold.

A cluster of its own: declared models stay in the controller's table, which other tests'
shared clusters must not see.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from controller.protocol import DeclaredModel
from fleetserve.protocol import Heartbeat, HeartbeatReply, WorkerLoad, WorkerState
from tests.gateway.inproc import WAIT_S, InProcessCluster, eventually, in_process_cluster
from workers.fake.engine import FakeEngine

pytestmark = pytest.mark.anyio

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
HELD = "fleetserve_gateway_held_requests"
HOLDS = "fleetserve_gateway_hold_seconds_count"


@pytest.fixture(scope="module")
async def local() -> AsyncIterator[InProcessCluster]:
    async with in_process_cluster() as cluster, cluster.model("other"):
        yield cluster


@contextlib.asynccontextmanager
async def declared(local: InProcessCluster, model: DeclaredModel) -> AsyncIterator[None]:
    """``model`` declared through the controller's API, then no longer."""
    body = model.model_dump(mode="json")
    (await local.http.put(f"/models/{model.name}", json=body)).raise_for_status()
    await local.settle()
    try:
        yield
    finally:
        (await local.http.delete(f"/models/{model.name}")).raise_for_status()
        await local.settle()


async def test_a_declared_model_is_listed_as_starting_and_a_typo_is_still_404(
    local: InProcessCluster,
) -> None:
    async with local.gateway(hold_timeout_s=0.2) as gateway:
        client = gateway.client()
        async with declared(local, DeclaredModel(name="big", aliases=["big-alias"], replicas=2)):
            listed = {m.id: m.model_extra for m in (await client.models.list()).data}
            assert listed["big"] == listed["big-alias"]
            assert listed["big"] is not None
            assert (listed["big"]["state"], listed["big"]["replicas_ready"]) == ("starting", 0)
            assert listed["big"]["replicas"] == 2
            assert listed["other"] is not None and listed["other"]["state"] == "ready"
            assert (await client.models.retrieve("big")).id == "big"
            with pytest.raises(openai.NotFoundError) as typo:
                await client.chat.completions.create(model="bgi", messages=HI)
            assert typo.value.code == "model_not_found"
            states = (await local.http.get("/models")).json()
            big = {"name": "big", "declared": True, "replicas": 2, "ready": 0, "state": "starting"}
            assert {
                **big,
                "base": None,
                "registered_on": [],
                "demand_age_s": None,
            } in states  # (none: replicas are wanted)
        with pytest.raises(openai.NotFoundError):  # no longer declared: unknown again
            await client.models.retrieve("big")
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="big", messages=HI)


async def test_a_held_request_is_answered_once_a_worker_is_ready(
    local: InProcessCluster,
) -> None:
    async with (
        local.gateway(hold_timeout_s=WAIT_S * 3) as gateway,
        declared(local, DeclaredModel(name="cold")),
    ):
        before = await gateway.metric(HOLDS, model="cold", outcome="ready")
        asked = asyncio.create_task(
            gateway.client().chat.completions.create(model="cold", messages=HI, max_tokens=2)
        )

        async def held() -> bool:
            return await gateway.metric(HELD, model="cold") == 1

        await eventually(held, "the request held")
        assert not asked.done()
        async with local.model("cold"):  # its first worker registers
            answer = await asyncio.wait_for(asked, WAIT_S)
        assert answer.choices[0].message.content == " tok0 tok1"
        assert await gateway.metric(HELD, model="cold") == 0
        assert await gateway.metric(HOLDS, model="cold", outcome="ready") == before + 1


async def test_past_the_hold_it_is_503_with_retry_after_and_why(local: InProcessCluster) -> None:
    async with (
        local.gateway(hold_timeout_s=0.3) as gateway,
        declared(local, DeclaredModel(name="slow", replicas=2, note="worker-1 exited (code 1)")),
    ):
        with pytest.raises(openai.InternalServerError) as refused:
            await gateway.client().chat.completions.create(model="slow", messages=HI)
        assert refused.value.status_code == 503 and refused.value.code == "model_not_ready"
        body = refused.value.body
        assert isinstance(body, dict)
        message = body["message"]
        # what starts its replicas says why (`fleetserve up`: a worker that exited)
        assert "`slow` is not ready (starting: 0 of 2 replicas ready; worker-1 exited" in message
        assert int(refused.value.response.headers["retry-after"]) > 0
        assert await gateway.metric(HOLDS, model="slow", outcome="timed_out") == 1

        with pytest.raises(anthropic.InternalServerError) as overloaded:  # Anthropic's format
            await gateway.anthropic().messages.create(
                model="slow", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
        assert overloaded.value.status_code == 503
        body = overloaded.value.body
        assert isinstance(body, dict) and body["type"] == "error"
        assert body["error"]["type"] == "overloaded_error"
        assert message.split("; waited")[0] in body["error"]["message"]  # (its own wait)
        assert int(overloaded.value.response.headers["retry-after"]) > 0


async def test_the_hold_counts_toward_the_request_timeout(local: InProcessCluster) -> None:
    """request_timeout_s shorter than the hold ends the hold: the same 503, not a 504."""
    async with (
        local.gateway(hold_timeout_s=WAIT_S * 3, request_timeout_s=0.3) as gateway,
        declared(local, DeclaredModel(name="slow")),
    ):
        with pytest.raises(openai.InternalServerError) as refused:
            await asyncio.wait_for(
                gateway.client().chat.completions.create(model="slow", messages=HI), WAIT_S
            )
        assert refused.value.status_code == 503 and refused.value.code == "model_not_ready"


async def test_fallbacks_answer_after_the_hold(local: InProcessCluster) -> None:
    async with (
        local.gateway(hold_timeout_s=0.3) as gateway,
        declared(local, DeclaredModel(name="primary", fallbacks=["other"])),
    ):
        raw = await gateway.client().chat.completions.with_raw_response.create(
            model="primary", messages=HI, max_tokens=2
        )
        assert raw.headers["x-fleetserve-model"] == "other"
        assert await gateway.metric(HOLDS, model="primary", outcome="timed_out") == 1


async def test_a_request_for_a_model_scaled_to_zero_is_demand_at_the_controller(
    local: InProcessCluster,
) -> None:
    """What starts replicas on demand (`fleetserve up`) reads it from GET /models."""

    async def demand_age_s() -> float | None:
        states = {m["name"]: m for m in (await local.http.get("/models")).json()}
        age: float | None = states["idle"]["demand_age_s"]
        return age

    async with (
        local.gateway(hold_timeout_s=0.3) as gateway,
        declared(local, DeclaredModel(name="idle", replicas=0)),
    ):
        assert (await gateway.client().models.retrieve("idle")).model_extra == {
            "endpoints": [],
            "fallbacks": [],
            "state": "scaled_to_zero",
            "replicas_ready": 0,
            "replicas": 0,
        }
        assert await demand_age_s() is None
        with pytest.raises(openai.InternalServerError) as refused:
            await gateway.client().chat.completions.create(model="idle", messages=HI)
        assert "scaled to zero: no replica running" in str(refused.value.message)

        async def demanded() -> bool:
            return await demand_age_s() is not None

        await eventually(demanded, "the demand at the controller")


async def test_requests_for_a_model_whose_workers_sleep_are_held_and_wake_them(
    local: InProcessCluster,
) -> None:
    """vLLM's sleep mode (workers/sleep.py): a worker registered asleep is never routed to;
    its model, declared or not, is listed as sleeping and its requests are held; the gateway
    tells the controller, whose reply to the worker's next heartbeat says wake."""
    async with (
        local.gateway(hold_timeout_s=0.3) as gateway,
        local.model("dozy", state=WorkerState.SLEEPING) as workers,
    ):
        client = gateway.client()
        assert (await client.models.retrieve("dozy")).model_extra == {
            "endpoints": sorted(FakeEngine.served_endpoints),
            "fallbacks": [],
            "state": "sleeping",
            "replicas_ready": 0,
            "replicas": 0,
        }
        (worker_id,) = workers.ids
        beat = Heartbeat(worker_id=worker_id, load=WorkerLoad()).model_dump(mode="json")

        async def told_to_wake() -> bool:
            reply = await local.http.post("/workers/heartbeat", json=beat)
            return bool(HeartbeatReply.model_validate(reply.json()).wake)

        assert not await told_to_wake()
        with pytest.raises(openai.InternalServerError) as refused:
            await client.chat.completions.create(model="dozy", messages=HI)
        assert "asleep: waking 1 replica(s)" in str(refused.value.message)
        await eventually(told_to_wake, "the controller to wake the worker")
        assert workers.engines[worker_id].requests == 0  # never routed to while asleep
