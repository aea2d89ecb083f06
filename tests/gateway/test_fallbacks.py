"""Fallbacks between models (gateway/serving.py), in-process: when model A cannot answer, the
gateway asks the models of A's `fallbacks` in turn, those the key may use; the answer says
which model gave it, which is charged and counted; a stream that started stays with A.

A cluster of its own: a model with fallbacks stays in the controller's table after its last
worker leaves (so that its requests still go to its fallbacks), which the other tests'
shared cluster must not see.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from fleetserve.protocol import Registration
from gateway.settings import ApiKey, hash_key
from tests.gateway.inproc import GatewayUnderTest, InProcessCluster, in_process_cluster
from workers.fake.server import FakeServer, Fault

pytestmark = pytest.mark.anyio

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
MODEL = "x-fleetserve-model"


def _key(name: str, **limits: object) -> ApiKey:
    return ApiKey.model_validate({"name": name, "key_sha256": hash_key(f"sk-{name}"), **limits})


@dataclass
class Cluster:
    cluster: InProcessCluster
    #: The engine of model-b's one worker.
    b: FakeServer


@pytest.fixture(scope="module")
async def fallbacks() -> AsyncIterator[Cluster]:
    """model-b and model-c answer; model-a's workers come and go per test."""
    async with (
        in_process_cluster() as local,
        local.model("model-b") as b,
        local.model("model-c"),
    ):
        yield Cluster(local, b.engines["model-b-0"])


@pytest.fixture(scope="module")
def own(fallbacks: Cluster) -> InProcessCluster:
    return fallbacks.cluster


@pytest.fixture(scope="module")
async def gateway(own: InProcessCluster) -> AsyncIterator[GatewayUnderTest]:
    keys = [
        _key("all"),
        _key("no-b", models=["model-a", "model-c"]),
        _key("a-only", models=["model-a"]),
    ]
    async with own.gateway(keys=keys) as shared:
        yield shared


async def _chat(gateway: GatewayUnderTest, key: str = "sk-all", **extra: object) -> tuple[str, str]:
    """(the model that answered, the worker) of one chat completion to model-a."""
    raw = await gateway.client(key).chat.completions.with_raw_response.create(
        model="model-a",
        messages=HI,
        max_tokens=2,
        **extra,  # type: ignore[arg-type]
    )
    assert raw.parse().choices[0].message.content == " tok0 tok1"  # B's engine knew its name
    return raw.headers[MODEL], raw.headers["x-fleetserve-worker"]


async def test_a_model_that_answers_is_its_own_answer(
    own: InProcessCluster, gateway: GatewayUnderTest
) -> None:
    async with own.model("model-a", fallbacks=("model-b",)):
        assert await _chat(gateway) == ("model-a", "model-a-0")


async def test_every_worker_failing_before_the_first_byte_falls_back(
    own: InProcessCluster, gateway: GatewayUnderTest
) -> None:
    pair = {"model": "model-a", "fallback": "model-b"}
    before = await gateway.metric("fleetserve_gateway_fallbacks_total", **pair)
    async with own.model("model-a", 0, dead=2, fallbacks=("model-b", "model-c")):
        assert await _chat(gateway) == ("model-b", "model-b-0")
    assert await gateway.metric("fleetserve_gateway_fallbacks_total", **pair) == before + 1


async def test_no_ready_worker_falls_back_even_after_the_last_worker_left(
    own: InProcessCluster, gateway: GatewayUnderTest
) -> None:
    async with own.model("model-a", fallbacks=("model-b",)) as a:
        (await own.http.post(f"/workers/{a.ids[0]}/drain")).raise_for_status()
        await own.settle()
        assert (await _chat(gateway))[0] == "model-b"  # draining: no ready worker
    # deregistered: the controller keeps the model (and its fallbacks) in its table
    assert "model-a" in {m.name for m in (await own.table()).models}
    assert (await _chat(gateway))[0] == "model-b"
    models = await gateway.client("sk-all").models.retrieve("model-a")
    assert models.model_extra == {
        "endpoints": [],
        "fallbacks": ["model-b"],
        "state": "unavailable",
        "replicas_ready": 0,
        "replicas": 0,
    }


@pytest.mark.parametrize("status", [429, 503])
async def test_an_engine_answering_busy_falls_back(
    own: InProcessCluster, fallbacks: Cluster, gateway: GatewayUnderTest, status: int
) -> None:
    async with own.model("model-a", fallbacks=("model-b",)) as a:
        a.engines["model-a-0"].reject_status = status
        assert (await _chat(gateway))[0] == "model-b"
        # ...to the first fallback that answers; with none left, the engine's own answer
        fallbacks.b.reject_status = status
        try:
            with pytest.raises(openai.APIStatusError) as refused:
                await _chat(gateway)
        finally:
            fallbacks.b.reject_status = 0
    assert refused.value.status_code in (status, 502)  # a 503 is a failed worker too


async def test_fallbacks_the_key_may_not_use_are_skipped(
    own: InProcessCluster, gateway: GatewayUnderTest
) -> None:
    async with own.model("model-a", 0, dead=1, fallbacks=("model-b", "model-c")):
        assert (await _chat(gateway, "sk-no-b"))[0] == "model-c"
        with pytest.raises(openai.APIStatusError) as failed:  # nothing it may use answers
            await _chat(gateway, "sk-a-only")
    assert failed.value.status_code in (502, 503)  # failed, or cooled down after it failed


async def test_the_model_that_answered_is_charged_and_counted(own: InProcessCluster) -> None:
    async with (
        own.model("model-a", 0, dead=1, fallbacks=("model-b",)),
        # 60 tokens a minute: the budget refills by one a second, slow beside what is charged
        own.gateway(keys=[_key("t", tpm=60)]) as gateway,
    ):
        raw = await gateway.client("sk-t").chat.completions.with_raw_response.create(
            model="model-a", messages=HI, max_tokens=20
        )
        assert raw.headers[MODEL] == "model-b"
        usage = raw.parse().usage
        assert usage is not None and usage.total_tokens > 20
        # the next request sees B's tokens charged to the key's budget
        after = await gateway.client("sk-t").chat.completions.with_raw_response.create(
            model="model-b", messages=HI, max_tokens=1
        )
        assert int(after.headers["x-ratelimit-remaining-tokens"]) < 60 - 20
        b = {"model": "model-b", "key": "t"}
        assert await gateway.metric("fleetserve_gateway_completion_tokens_total", **b) == 20 + 1
        assert await gateway.metric("fleetserve_gateway_requests_total", status="200", **b) == 2
        assert not await gateway.metric(
            "fleetserve_gateway_requests_total", model="model-a", status="200", key="t"
        )


@contextlib.asynccontextmanager
async def dying_engine() -> AsyncIterator[str]:
    """A loopback engine that starts a stream, sends two tokens and dies (its connection
    is cut): its base URL."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for token in ("tok0", "tok1"):
            event = b'data: {"choices": [{"index": 0, "delta": {"content": "%s"}}]}\n\n' % (
                token.encode()
            )
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_stream_that_started_never_switches_models(
    own: InProcessCluster, fallbacks: Cluster, gateway: GatewayUnderTest
) -> None:
    """A's engine dies mid-stream: the client gets A's tokens and an error, nothing of B's."""
    served_by_b = fallbacks.b.finished
    async with dying_engine() as url:
        await own.register(
            Registration(
                worker_id="model-a-dying",
                model_names=["model-a"],
                base_url=f"{url}/v1",
                engine="fake",
                capacity=4,
                fallbacks=["model-b"],
            )
        )
        await own.settle()
        try:
            stream = await gateway.client("sk-all").chat.completions.with_raw_response.create(
                model="model-a", messages=HI, max_tokens=200, stream=True
            )
            assert stream.headers[MODEL] == "model-a"
            tokens = []
            with pytest.raises(openai.APIError) as broken:  # the proxy's error event
                async for chunk in stream.parse():  # type: ignore[union-attr]
                    tokens.append(chunk.choices[0].delta.content)
        finally:
            await own.deregister("model-a-dying")
            await own.settle()
    assert tokens == ["tok0", "tok1"]
    assert "mid-stream" in str(broken.value)
    assert fallbacks.b.finished == served_by_b


async def test_a_stream_on_a_fallback_resumes_on_the_fallbacks_other_worker(
    own: InProcessCluster, gateway: GatewayUnderTest
) -> None:
    """Model D's only worker is down, so its stream goes to fallback E, whose worker then
    fails after 5 tokens: E's other worker finishes it (asked by E's name), and the client
    reads E's uninterrupted answer."""
    async with (
        own.model("model-e", 2, routing_policy="round_robin", vocabulary="lm") as e,
        own.model("model-d", 0, dead=1, fallbacks=("model-e",)),
    ):
        first, second = e.ids  # round robin: the first request goes to the first
        e.engines[first].fault = Fault("reset", after_tokens=5)
        stream = await gateway.client("sk-all").chat.completions.create(
            model="model-d", messages=HI, max_tokens=12, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        url = f"{e.urls[second]}/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as direct:
            whole = await direct.chat.completions.create(
                model="model-e", messages=HI, max_tokens=12
            )
    assert e.engines[first].requests == 1 and e.engines[second].requests == 2
    assert text == whole.choices[0].message.content
