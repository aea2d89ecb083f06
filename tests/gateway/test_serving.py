"""What a client of the gateway sees before and around its answer (gateway/serving.py), in-process:
errors in OpenAI's envelope, API keys and their limits, the request timeout, and the usage
rewrite that counts every answer's tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.settings import ApiKey, GatewaySettings, hash_key
from tests.gateway.inproc import GatewayUnderTest, InProcessCluster, refusing_port, running_gateway

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def _error(response: httpx.Response) -> dict[str, str | None]:
    assert response.headers["content-type"] == "application/json"
    error: dict[str, str | None] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


async def test_unknown_model_is_404_model_not_found(gateway: GatewayUnderTest) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await gateway.client().chat.completions.create(model="nope", messages=HI)
    body = missing.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"], body["type"]) == (
        "model_not_found",
        "model",
        "invalid_request_error",
    )


@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        (CHAT, b'{"model": "echo", "messages": [', "invalid_json", None),
        (CHAT, b'["not", "an", "object"]', "invalid_json", None),
        (CHAT, b"", "invalid_json", None),
        (CHAT, b'{"messages": []}', "missing_required_parameter", "model"),
        (CHAT, b'{"model": "", "messages": []}', "missing_required_parameter", "model"),
        (CHAT, b'{"model": 7, "messages": []}', "missing_required_parameter", "model"),
        (CHAT, b'{"model": "echo"}', "missing_required_parameter", "messages"),
        (CHAT, b'{"model": "echo", "messages": null}', "missing_required_parameter", "messages"),
        (CHAT, b'{"model": "echo", "messages": "hi"}', "invalid_type", "messages"),
        (COMPLETIONS, b'{"model": "echo"}', "missing_required_parameter", "prompt"),
        (COMPLETIONS, b'{"model": "echo", "prompt": 7}', "invalid_type", "prompt"),
        (CHAT, b'{"model": "echo", "messages": [], "stream": "yes"}', "invalid_type", "stream"),
        (
            COMPLETIONS,
            b'{"model": "echo", "prompt": "x", "stream": true, "stream_options": "usage"}',
            "invalid_type",
            "stream_options",
        ),
        (
            CHAT,
            b'{"model": "echo", "messages": [], "max_tokens": 0}',
            "invalid_value",
            "max_tokens",
        ),
        (
            CHAT,
            b'{"model": "echo", "messages": [], "max_tokens": "16"}',
            "invalid_value",
            "max_tokens",
        ),
        (
            COMPLETIONS,
            b'{"model": "echo", "prompt": "x", "max_completion_tokens": true}',
            "invalid_value",
            "max_completion_tokens",
        ),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(
    gateway: GatewayUnderTest, path: str, body: bytes, code: str, param: str | None
) -> None:
    response = await gateway.http.post(path, content=body)
    assert response.status_code == 400
    error = _error(response)
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")


async def test_max_tokens_over_the_gateways_limit_is_400(cluster: InProcessCluster) -> None:
    async with cluster.gateway(max_tokens_limit=1000) as gateway:
        client = gateway.client()
        for field in ("max_tokens", "max_completion_tokens"):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    model="echo",
                    messages=HI,
                    extra_body={field: 1001},
                )
            assert refused.value.code == "max_tokens_too_large"
            assert refused.value.param == field
        reply = await client.chat.completions.create(model="echo", messages=HI, max_tokens=1000)
        assert reply.usage is not None and reply.usage.completion_tokens == 1000


async def test_body_over_max_body_bytes_is_413(cluster: InProcessCluster) -> None:
    async with cluster.gateway(max_body_bytes=1024) as gateway:
        head = b'{"model": "echo", "messages": [], "max_tokens": 1, "pad": "'
        exactly = head + b"x" * (1024 - len(head) - 2) + b'"}'
        assert len(exactly) == 1024
        assert (await gateway.http.post(CHAT, content=exactly)).status_code == 200

        too_large = exactly[:-2] + b'x"}'
        declared = await gateway.http.post(CHAT, content=too_large)  # with a content-length

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
            for start in range(0, len(too_large), 100):
                yield too_large[start : start + 100]

        chunked = await gateway.http.post(CHAT, content=chunks())
        for response in (declared, chunked):
            assert response.status_code == 413
            error = _error(response)
            assert (error["code"], error["type"]) == ("request_too_large", "invalid_request_error")


async def test_no_routing_table_yet_is_503() -> None:
    with refusing_port() as port:
        # the request waits for a first table (hold_timeout_s), as for a starting model
        settings = GatewaySettings(controller_url=f"http://127.0.0.1:{port}", hold_timeout_s=0.2)
        async with running_gateway(settings) as lonely:
            with pytest.raises(openai.InternalServerError) as unavailable:
                await lonely.client().chat.completions.create(model="echo", messages=HI)
    assert unavailable.value.status_code == 503
    assert int(unavailable.value.response.headers["retry-after"]) > 0
    body = unavailable.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["type"]) == ("no_routing_table", "server_error")


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_unknown_path_is_404_not_found(gateway: GatewayUnderTest, method: str) -> None:
    response = await gateway.http.request(method, "/v1/nothing", content=b"{}")
    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


# -- API keys -----------------------------------------------------------------


def _key(name: str, **limits: object) -> ApiKey:
    return ApiKey.model_validate({"name": name, "key_sha256": hash_key(f"sk-{name}"), **limits})


async def test_missing_or_wrong_key_is_401(cluster: InProcessCluster) -> None:
    async with cluster.gateway(keys=[_key("team")]) as gateway:
        missing = await gateway.http.post(CHAT, json={"model": "echo", "messages": HI})
        assert missing.status_code == 401
        assert _error(missing)["code"] == "missing_api_key"
        assert (await gateway.http.get("/v1/models")).status_code == 401
        wrong = gateway.client("sk-wrong")
        with pytest.raises(openai.AuthenticationError) as refused:
            await wrong.chat.completions.create(model="echo", messages=HI, max_tokens=1)
        assert refused.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        reply = await gateway.client("sk-team").chat.completions.create(
            model="echo", messages=HI, max_tokens=1
        )
        assert reply.choices[0].message.content == " tok0"


async def test_a_key_sees_and_uses_only_its_models(cluster: InProcessCluster) -> None:
    keys = [_key("team", models=["echo", "echo-alias"]), _key("anyone")]
    async with cluster.gateway(keys=keys) as gateway:
        team = gateway.client("sk-team")
        assert {m.id async for m in team.models.list()} == {"echo", "echo-alias"}
        anyone = {m.id async for m in gateway.client("sk-anyone").models.list()}
        assert anyone == {"echo", "echo-alias", "other"}
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await team.chat.completions.create(model="other", messages=HI)
        assert (refused.value.code, refused.value.param) == ("model_not_allowed", "model")
        await team.chat.completions.create(model="echo-alias", messages=HI, max_tokens=1)


async def test_requests_per_minute_limit_is_429_with_retry_after(
    cluster: InProcessCluster,
) -> None:
    async with cluster.gateway(keys=[_key("team", models=["echo"], rpm=3)]) as gateway:
        client = gateway.client("sk-team")
        with pytest.raises(openai.PermissionDeniedError):  # refused before it costs a request
            await client.chat.completions.create(model="other", messages=HI)
        remaining = []
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(
                model="echo",
                messages=HI,
                max_tokens=1,
            )
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert remaining == ["2", "1", "0"]
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="echo", messages=HI, max_tokens=1)
    headers = limited.value.response.headers
    assert limited.value.code == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")


async def test_tokens_per_minute_limit_counts_usage_even_on_streams(
    cluster: InProcessCluster,
) -> None:
    async with cluster.gateway(keys=[_key("t", tpm=60)]) as gateway:
        client = gateway.client("sk-t")
        # a stream whose client did not ask for usage: charged, and no usage event shows
        stream = await client.chat.completions.create(
            model="echo",
            messages=HI,
            max_tokens=30,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
        assert chunks and all(chunk.choices and chunk.usage is None for chunk in chunks)
        reply = await client.chat.completions.with_raw_response.create(
            model="echo",
            messages=HI,
            max_tokens=30,
        )
        assert int(reply.headers["x-ratelimit-remaining-tokens"]) < 60 - 30  # the stream counted
        with pytest.raises(openai.RateLimitError) as limited:  # 2 x (30 + prompt) > 60
            await client.chat.completions.create(model="echo", messages=HI, max_tokens=1)
        assert limited.value.response.headers["x-ratelimit-limit-tokens"] == "60"
        assert int(limited.value.response.headers["retry-after"]) >= 1


# -- the request timeout ----------------------------------------------------------


async def test_request_timeout_is_504_and_streams_need_only_their_first_byte_in_time(
    cluster: InProcessCluster,
) -> None:
    # 4 tokens/s: 10 tokens take 2.25 s, 4 take 0.75 s; the first comes at once
    async with (
        cluster.model("slow", tokens_per_s=4),
        cluster.gateway(request_timeout_s=0.5) as gateway,
    ):
        client = gateway.client()
        loop = asyncio.get_running_loop()  # the gateway's clock (gateway/clock.py)
        started = loop.time()
        with pytest.raises(openai.APIStatusError) as late:
            await client.chat.completions.create(model="slow", messages=HI, max_tokens=10)
        assert loop.time() - started < 2.25  # cut off, not answered in full
        assert (late.value.status_code, late.value.code) == (504, "timeout")
        assert await gateway.metric("fleetserve_gateway_in_flight_requests") == 0  # let go
        stream = await client.completions.create(
            model="slow", prompt="x", max_tokens=4, stream=True
        )
        text = [chunk.choices[0].text async for chunk in stream]
        assert text == [" tok0", " tok1", " tok2", " tok3"]  # 0.75 s: longer than the timeout


# -- the usage rewrite -------------------------------------------------------------


@pytest.mark.parametrize(
    "stream_options",
    [None, {}, {"include_usage": False}, {"include_usage": False, "continuous_usage": False}],
    ids=["absent", "empty", "usage-false", "more-options"],
)
async def test_a_stream_gets_no_usage_event_unless_it_asks(
    gateway: GatewayUnderTest, stream_options: dict[str, bool] | None
) -> None:
    completion_tokens = "fleetserve_gateway_completion_tokens_total"
    counted = await gateway.metric(completion_tokens, model="echo", key="none")
    extra = {} if stream_options is None else {"stream_options": stream_options}
    stream = await gateway.client().chat.completions.create(
        model="echo",
        messages=HI,
        max_tokens=3,
        stream=True,
        extra_body=extra,
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == " tok0 tok1 tok2"
    # the gateway asked the engine for the usage all the same, and counted it
    assert await gateway.metric(completion_tokens, model="echo", key="none") == counted + 3


async def test_a_stream_that_asks_for_usage_gets_one_usage_event(
    gateway: GatewayUnderTest,
) -> None:
    stream = await gateway.client().completions.create(
        model="echo",
        prompt="x",
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *tokens, last = chunks
    assert [chunk.choices[0].text for chunk in tokens] == [" tok0", " tok1", " tok2"]
    assert all(chunk.usage is None for chunk in tokens)
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 3


async def test_token_counts_reach_metrics(cluster: InProcessCluster) -> None:
    async with cluster.gateway() as gateway:
        client = gateway.client()
        reply = await client.chat.completions.create(model="echo", messages=HI, max_tokens=5)
        assert reply.usage is not None
        stream = await client.chat.completions.create(
            model="echo",
            messages=HI,
            max_tokens=3,
            stream=True,
        )
        assert [chunk async for chunk in stream]  # no usage asked: the gateway counts anyway
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=HI)
        samples = await gateway.metrics()

    def sample(name: str, **labels: str) -> float | None:
        return samples.get((name, frozenset(labels.items())))

    echo = {"model": "echo", "key": "none"}
    assert sample("fleetserve_gateway_prompt_tokens_total", **echo) == 2 * reply.usage.prompt_tokens
    assert sample("fleetserve_gateway_completion_tokens_total", **echo) == 5 + 3
    assert sample("fleetserve_gateway_requests_total", status="200", **echo) == 2
    assert sample("fleetserve_gateway_requests_total", model="unknown", status="404", key="none")
    # client-chosen names do not become label values
    assert not [labels for _, labels in samples if ("model", "nope") in labels]
    ttft = "fleetserve_gateway_time_to_first_token_seconds_count"
    assert sample(ttft, model="echo") == 1  # the stream
