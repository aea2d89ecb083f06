"""Circuit breakers, the retry budget and backoff (gateway/breaker.py): the rules with a
hand-made clock, then what a gateway does with them, in-process."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from fleetserve import constants
from gateway.breaker import Circuit, CircuitBreakers, RetryBudget, backoff_s
from tests.gateway.inproc import GatewayUnderTest, InProcessCluster, eventually
from workers.fake.server import Fault

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_circuit_opens_after_failures_in_a_row_is_probed_and_closes() -> None:
    clock = Clock()
    breakers = CircuitBreakers(failures=3, open_s=5.0, clock=clock)
    breakers.failed("w")
    breakers.failed("w")
    breakers.succeeded("w")  # a success between: the count starts again
    breakers.failed("w")
    breakers.failed("w")
    assert breakers.available("w", clock.now)
    breakers.failed("w")
    assert breakers.state("w", clock.now) is Circuit.OPEN
    assert not breakers.available("w", clock.now + 4.9)
    clock.now += 5.0  # half-open: one probe
    assert breakers.state("w", clock.now) is Circuit.HALF_OPEN
    assert breakers.available("w", clock.now)
    breakers.picked("w")
    assert not breakers.available("w", clock.now)  # only one probe at a time
    breakers.failed("w")  # the probe failed: open twice as long
    assert not breakers.available("w", clock.now + 9.9) and breakers.available("w", clock.now + 10)
    clock.now += 10
    breakers.picked("w")
    breakers.done("w")  # the probe's client left: no verdict, another request may probe
    assert breakers.available("w", clock.now)
    breakers.picked("w")
    breakers.succeeded("w")
    assert breakers.state("w", clock.now) is Circuit.CLOSED and breakers.states() == {}
    assert breakers.opened == {"w": 2}


def test_a_refused_connection_opens_at_once_and_the_wait_is_capped() -> None:
    clock = Clock()
    breakers = CircuitBreakers(failures=3, open_s=5.0, clock=clock)
    breakers.failed("dead", refused=True)
    assert breakers.state("dead", clock.now) is Circuit.OPEN
    for _ in range(10):
        clock.now += constants.CIRCUIT_OPEN_MAX_S
        breakers.picked("dead")
        breakers.failed("dead", refused=True)
    assert breakers.available("dead", clock.now + constants.CIRCUIT_OPEN_MAX_S)
    # a stream that started before the circuit opened and fails now does not extend it
    breakers.failed("dead")
    assert breakers.available("dead", clock.now + constants.CIRCUIT_OPEN_MAX_S)


def test_the_retry_budget_allows_a_fraction_of_requests_per_window() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, clock=clock)
    for _ in range(100):
        budget.request(clock.now)
    allowed = sum(budget.allow(in_flight=0) for _ in range(50))
    assert allowed == 20 and budget.refused == 30
    # requests in flight count too: long streams, few new requests
    assert budget.allow(in_flight=500)
    clock.now += constants.RETRY_BUDGET_WINDOW_S  # a window later, nothing counted any more
    assert not budget.allow(in_flight=0)
    budget.request(clock.now)
    floor = RetryBudget(ratio=0.2, min_per_s=1.0, clock=clock)  # a quiet gateway may retry
    assert sum(floor.allow(in_flight=0) for _ in range(20)) == constants.RETRY_BUDGET_WINDOW_S


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(7)
    waits = [[backoff_s(retry, rng) for _ in range(200)] for retry in (1, 2, 3, 10)]
    for retry, samples in zip((1, 2, 3), waits, strict=False):
        cap = constants.RETRY_BACKOFF_BASE_S * 2 ** (retry - 1)
        assert min(samples) >= 0 and max(samples) <= cap and max(samples) > cap / 2
    assert max(waits[3]) <= constants.RETRY_BACKOFF_MAX_S


# -- in a gateway ---------------------------------------------------------------------


async def _circuit(gateway: GatewayUnderTest, worker: str) -> str:
    status = (await gateway.http.get("/status")).json()
    return next((w["circuit"] for w in status["workers"] if w["worker_id"] == worker), "?")


@pytest.mark.anyio
async def test_a_worker_answering_500s_is_taken_out_probed_and_put_back(
    cluster: InProcessCluster,
) -> None:
    async with (
        cluster.model("flaky", 2, routing_policy="round_robin") as flaky,
        # open for 1.5 s of the loop's clock: the 12 requests below take next to none of it
        # (the test loop's clock moves only when the loop has nothing to do: conftest.py)
        cluster.gateway(circuit_failures=3, circuit_open_s=1.5) as gateway,
    ):
        sick_id, healthy_id = flaky.ids
        sick = flaky.engines[sick_id]
        sick.fault = Fault("http500")
        client = gateway.client()
        for _ in range(12):  # each request that meets the sick worker is retried: all succeed
            reply = await client.chat.completions.create(model="flaky", messages=HI, max_tokens=1)
            assert reply.choices[0].message.content == " tok0"
        assert sick.requests == 3  # taken out after 3 failures in a row
        assert await _circuit(gateway, sick_id) == "open"
        state = "fleetserve_gateway_worker_circuit_state"
        assert await gateway.metric(state, worker=sick_id) == 2
        assert await gateway.metric("fleetserve_gateway_circuit_opened_total", worker=sick_id) == 1

        async def probed(times: int) -> bool:
            await client.chat.completions.create(model="flaky", messages=HI, max_tokens=1)
            return sick.requests == 3 + times

        await asyncio.sleep(1.5)  # the circuit's open time passes: the next request may probe
        await eventually(lambda: probed(1), "a probe of the sick worker")  # still failing
        assert await _circuit(gateway, sick_id) == "open"
        sick.fault = None  # it recovers
        await asyncio.sleep(3.0)  # a failed probe opens the circuit twice as long
        await eventually(lambda: probed(2), "a second probe")
        assert await _circuit(gateway, sick_id) == "closed"
        served = sick.finished
        for _ in range(4):
            await client.chat.completions.create(model="flaky", messages=HI, max_tokens=1)
        assert sick.finished == served + 2  # back in the rotation: round robin, one in two
        assert await gateway.metric(state, worker=sick_id) == 0  # no longer listed
        assert await _circuit(gateway, healthy_id) == "closed"


@pytest.mark.anyio
async def test_when_every_worker_fails_the_retry_budget_caps_the_retries(
    cluster: InProcessCluster,
) -> None:
    """Three workers answer 500 to everything (circuits kept closed to see the budget alone):
    100 requests cost at most 1.2x their number in attempts, not 3x."""
    requests = 100
    async with (
        cluster.model("down", 3) as down,
        cluster.gateway(
            retry_budget_ratio=0.2, retry_budget_min_per_s=0.0, circuit_failures=10_000
        ) as gateway,
    ):
        for engine in down.engines.values():
            engine.fault = Fault("http500")
        client = gateway.client()
        for _ in range(requests):
            with pytest.raises(openai.InternalServerError) as failed:
                await client.chat.completions.create(model="down", messages=HI, max_tokens=1)
            assert failed.value.status_code == 502
        attempts = sum(engine.requests for engine in down.engines.values())
        ratio = attempts / requests
        print(f"attempts per request when every worker fails: {ratio:.2f} (without a budget: 3)")
        assert requests < attempts <= requests * 1.2 + 1
        refused = await gateway.metric("fleetserve_gateway_retries_refused_total", model="down")
        assert refused >= requests - (attempts - requests)  # a request is refused at most once
