"""The whole API through the gateway, in-process: every route routed by `model`, each API's
own error format, keys as `Authorization: Bearer` or `x-api-key`, the capability check, audio
uploads (multipart), the models list and stored responses.

Audio: real speech models cannot be made here (no model hub), so multipart routing is
tested with the fake engine, whose "transcript" says what reached it. The real routes of
vLLM (embeddings, responses, Anthropic messages, tokenize) run in tests/test_api_vllm.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anthropic
import httpx
import openai
import pytest

from fleetserve.protocol import Registration
from gateway.protocol import ENDPOINTS
from gateway.settings import ApiKey, hash_key
from gateway.table import response_tag
from tests.gateway.inproc import GatewayUnderTest, InProcessCluster

pytestmark = pytest.mark.anyio

MESSAGE = [{"role": "user", "content": "hi"}]
JSON_PATHS = sorted(path for path, endpoint in ENDPOINTS.items() if not endpoint.multipart)
FORM_PATHS = sorted(path for path, endpoint in ENDPOINTS.items() if endpoint.multipart)
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def _key(name: str, **limits: object) -> ApiKey:
    return ApiKey.model_validate({"name": name, "key_sha256": hash_key(f"sk-{name}"), **limits})


@pytest.fixture(scope="module")
async def embedder(cluster: InProcessCluster) -> AsyncIterator[None]:
    """A model whose workers registered only /v1/embeddings (as a vLLM pooling worker does)."""
    async with cluster.model("embedder", endpoints=["/v1/embeddings"]):
        yield


@pytest.fixture(scope="module")
async def talker(cluster: InProcessCluster) -> AsyncIterator[None]:
    """A model whose workers registered Anthropic's routes (the fake engine answers them 404)."""
    async with cluster.model("talker", endpoints=list(ANTHROPIC_PATHS)):
        yield


@pytest.fixture(scope="module")
async def keyed(
    cluster: InProcessCluster, embedder: None, talker: None
) -> AsyncIterator[GatewayUnderTest]:
    keys = [_key("all"), _key("echo-only", models=["echo"]), _key("slow", rpm=1)]
    async with cluster.gateway(keys=keys) as gateway:
        yield gateway


def _openai_error(response: httpx.Response) -> dict[str, str | None]:
    error: dict[str, str | None] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _anthropic_error(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    error: dict[str, str] = body["error"]
    assert error["message"]
    return error


# -- routed by model, refused in each API's own format ------------------------------------


@pytest.mark.parametrize("path", JSON_PATHS)
async def test_a_body_without_model_is_400_in_the_routes_format(
    gateway: GatewayUnderTest, path: str
) -> None:
    response = await gateway.http.post(path, json={"messages": MESSAGE, "input": "x"})
    assert response.status_code == 400
    if path in ANTHROPIC_PATHS:
        assert _anthropic_error(response)["type"] == "invalid_request_error"
    else:
        error = _openai_error(response)
        assert (error["param"], error["code"]) == ("model", "missing_required_parameter")


@pytest.mark.parametrize("path", JSON_PATHS)
async def test_an_unknown_model_is_404_in_the_routes_format(
    gateway: GatewayUnderTest, path: str
) -> None:
    body = {"model": "nope", "messages": MESSAGE, "prompt": "x"}
    response = await gateway.http.post(path, json=body)
    assert response.status_code == 404
    if path in ANTHROPIC_PATHS:
        error = _anthropic_error(response)
        assert error["type"] == "not_found_error" and "nope" in error["message"]
    else:
        assert _openai_error(response)["code"] == "model_not_found"


async def test_an_endpoint_the_model_does_not_serve_is_404_naming_both(
    keyed: GatewayUnderTest,
) -> None:
    """Decided from the workers' registrations: no engine is asked."""
    with pytest.raises(openai.NotFoundError) as refused:
        await keyed.client("sk-all").chat.completions.create(model="embedder", messages=MESSAGE)  # type: ignore[arg-type]
    assert refused.value.code == "unsupported_endpoint"
    message = str(refused.value.message)
    assert "`embedder`" in message and "/v1/chat/completions" in message
    assert "/v1/embeddings" in message  # what it does serve
    with pytest.raises(anthropic.NotFoundError) as not_anthropic:
        await keyed.anthropic("sk-all").messages.create(
            model="echo", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    error = not_anthropic.value.body["error"]  # type: ignore[index]
    assert error["type"] == "not_found_error" and "/v1/messages" in error["message"]


async def test_unknown_paths_of_each_api_get_its_404(gateway: GatewayUnderTest) -> None:
    anthropic_path = await gateway.http.post("/v1/messages/batches", json={})
    assert anthropic_path.status_code == 404
    assert _anthropic_error(anthropic_path)["type"] == "not_found_error"
    openai_path = await gateway.http.post("/v1/assistants", json={})
    assert openai_path.status_code == 404 and _openai_error(openai_path)["code"] == "not_found"


async def test_anthropic_clients_get_anthropics_error_types(keyed: GatewayUnderTest) -> None:
    """The gateway's own errors on /v1/messages, through Anthropic's SDK."""
    messages = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, type[anthropic.APIStatusError], str]] = [
        ("sk-wrong", anthropic.AuthenticationError, "authentication_error"),
        ("sk-echo-only", anthropic.PermissionDeniedError, "permission_error"),
    ]
    for key, kind, expected in cases:
        with pytest.raises(kind) as refused:
            await keyed.anthropic(key).messages.create(
                model="talker",
                max_tokens=4,
                messages=messages,  # type: ignore[arg-type]
            )
        assert refused.value.body["error"]["type"] == expected  # type: ignore[index]
    slow = keyed.anthropic("sk-slow")
    with pytest.raises(anthropic.NotFoundError) as engines:  # the key's one request a minute
        await slow.messages.count_tokens(model="talker", messages=messages)  # type: ignore[arg-type]
    assert engines.value.response.headers["x-fleetserve-worker"] == "talker-0"
    with pytest.raises(anthropic.RateLimitError) as limited:
        await slow.messages.count_tokens(model="talker", messages=messages)  # type: ignore[arg-type]
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(limited.value.response.headers["retry-after"]) >= 1


async def test_failing_and_missing_workers_are_api_error_and_overloaded_for_anthropic(
    cluster: InProcessCluster,
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    async with (
        cluster.model("gone", 0, dead=1, endpoints=["/v1/messages"]) as gone,
        cluster.gateway() as gateway,
    ):
        client = gateway.anthropic()
        with pytest.raises(anthropic.APIStatusError) as failed:  # its worker refuses connections
            await client.messages.create(model="gone", max_tokens=4, messages=messages)  # type: ignore[arg-type]
        (await cluster.http.post(f"/workers/{gone.dead[0]}/drain")).raise_for_status()
        await cluster.settle()
        with pytest.raises(anthropic.APIStatusError) as unavailable:  # no ready worker
            await client.messages.create(model="gone", max_tokens=4, messages=messages)  # type: ignore[arg-type]
    assert failed.value.status_code == 502
    assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert unavailable.value.status_code == 503
    assert unavailable.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_a_request_timeout_is_anthropics_timeout_error(cluster: InProcessCluster) -> None:
    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the gateway gives up and closes the connection
        writer.close()

    silent = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    registration = Registration(
        worker_id="silent-0",
        model_names=["silent"],
        base_url=f"http://127.0.0.1:{port}/v1",
        engine="fake",
        capacity=1,
        endpoints=["/v1/messages"],
    )
    async with silent:
        await cluster.register(registration)
        try:
            async with cluster.gateway(request_timeout_s=0.3) as gateway:
                with pytest.raises(anthropic.APIStatusError) as late:
                    await gateway.anthropic().messages.create(
                        model="silent", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
                    )
        finally:
            await cluster.deregister("silent-0")
            await cluster.settle()
    assert late.value.status_code == 504
    assert late.value.body["error"]["type"] == "timeout_error"  # type: ignore[index]


# -- keys -----------------------------------------------------------------------------------


async def test_keys_are_taken_as_bearer_or_x_api_key_on_every_route(
    keyed: GatewayUnderTest,
) -> None:
    body = {"model": "echo", "messages": MESSAGE, "max_tokens": 1}
    by_header = await keyed.http.post(
        "/v1/chat/completions", json=body, headers={"x-api-key": "sk-all"}
    )
    assert by_header.status_code == 200, by_header.text
    models = await keyed.http.get("/v1/models", headers={"x-api-key": "sk-echo-only"})
    assert [m["id"] for m in models.json()["data"]] == ["echo"]
    wrong = await keyed.http.post("/v1/embeddings", json=body, headers={"x-api-key": "sk-no"})
    assert wrong.status_code == 401 and _openai_error(wrong)["code"] == "invalid_api_key"
    missing = await keyed.http.post("/v1/messages", json=body)
    assert missing.status_code == 401
    assert _anthropic_error(missing)["type"] == "authentication_error"


# -- the models list ------------------------------------------------------------------------


async def test_models_list_the_endpoints_each_serves(
    gateway: GatewayUnderTest, embedder: None, cluster: InProcessCluster
) -> None:
    await cluster.settle()
    client = gateway.client()
    listed = {m.id: m async for m in client.models.list()}
    assert listed["embedder"].model_extra == {
        "endpoints": ["/v1/embeddings"],
        "fallbacks": [],
        "state": "ready",
        "replicas_ready": 1,
        "replicas": 1,
    }
    echo = await client.models.retrieve("echo-alias")
    assert echo.id == "echo-alias"
    assert echo.model_extra is not None
    assert "/v1/audio/transcriptions" in echo.model_extra["endpoints"]
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")


async def test_a_key_cannot_retrieve_a_model_it_may_not_use(keyed: GatewayUnderTest) -> None:
    with pytest.raises(openai.NotFoundError):
        await keyed.client("sk-echo-only").models.retrieve("other")
    assert (await keyed.client("sk-echo-only").models.retrieve("echo")).id == "echo"


# -- audio: multipart forms -----------------------------------------------------------------


async def test_audio_uploads_are_routed_by_their_model_field(keyed: GatewayUnderTest) -> None:
    client = keyed.client("sk-all")
    audio = bytes(range(256)) * 40
    transcript = await client.audio.transcriptions.create(
        model="echo-alias", file=("clip.wav", audio), language="en"
    )
    assert transcript.text == f"{len(audio)} bytes of clip.wav (transcriptions)"
    translation = await client.audio.translations.create(model="echo", file=("b.mp3", b"x" * 9))
    assert translation.text == "9 bytes of b.mp3 (translations)"
    with pytest.raises(openai.PermissionDeniedError):
        await keyed.client("sk-echo-only").audio.transcriptions.create(
            model="other", file=("a.wav", audio)
        )
    with pytest.raises(openai.NotFoundError) as refused:  # a model without audio
        await client.audio.transcriptions.create(model="embedder", file=("a.wav", audio))
    assert refused.value.code == "unsupported_endpoint"


async def test_audio_of_25_mb_passes_and_more_is_413(gateway: GatewayUnderTest) -> None:
    """OpenAI takes audio files up to 25 MB: more than the 8 MB of a JSON body."""
    audio = b"\x01" * (25 * 1024 * 1024)
    transcript = await gateway.client().audio.transcriptions.create(
        model="echo", file=("long.wav", audio)
    )
    assert transcript.text == f"{len(audio)} bytes of long.wav (transcriptions)"
    too_long = await gateway.http.post(
        "/v1/audio/transcriptions",
        data={"model": "echo"},
        files={"file": ("longer.wav", audio + b"\x01" * (1024 * 1024))},
    )
    assert too_long.status_code == 413
    assert _openai_error(too_long)["code"] == "request_too_large"


@pytest.mark.parametrize("path", FORM_PATHS)
async def test_a_form_without_model_or_not_a_form_is_400(
    gateway: GatewayUnderTest, path: str
) -> None:
    no_model = await gateway.http.post(path, files={"file": ("a.wav", b"123")})
    assert no_model.status_code == 400 and _openai_error(no_model)["param"] == "model"
    json_body = await gateway.http.post(path, json={"model": "echo"})
    assert json_body.status_code == 400
    assert _openai_error(json_body)["code"] == "invalid_content_type"


# -- stored responses (Responses API) ----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix"), [("GET", ""), ("POST", "/cancel")], ids=["retrieve", "cancel"]
)
async def test_a_response_no_worker_has_is_404(
    gateway: GatewayUnderTest, cluster: InProcessCluster, method: str, suffix: str
) -> None:
    gone = f"resp_{response_tag('a-worker-long-gone')}{'0' * 32}"
    for response_id in (gone, "resp_made-elsewhere", "not-a-response-id"):
        response = await gateway.http.request(method, f"/v1/responses/{response_id}{suffix}")
        assert response.status_code == 404, response.text
        error = _openai_error(response)
        assert (error["code"], error["param"]) == ("response_not_found", "response_id")
    # an id naming a live worker goes to it (the fake engine has no Responses API: its 404)
    (worker,) = [w for w in (await cluster.table()).workers if w.worker_id == "echo-0"]
    live = f"resp_{response_tag(worker.worker_id)}{'1' * 32}"
    response = await gateway.http.request(method, f"/v1/responses/{live}{suffix}")
    assert response.status_code == 404 and response.headers["x-fleetserve-worker"] == "echo-0"


async def test_other_methods_on_a_stored_response_are_404(gateway: GatewayUnderTest) -> None:
    response = await gateway.http.delete("/v1/responses/resp_x")  # vLLM 0.32 has no DELETE
    assert response.status_code == 404 and _openai_error(response)["code"] == "not_found"
