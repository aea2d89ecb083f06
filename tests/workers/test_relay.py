"""The engine relay (workers/relay.py) in front of the fake engine on a Unix socket, in-process.

The red-team module (tests/test_security.py) runs the same refusals against the engines
real workers start (vLLM, llama-server, the fake one); here the relay's own behaviour:
every request checked, everything else passed through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from fleetserve.http import EmbeddedServer, HttpLimits, make_config
from tests.fleetserve.test_http import read_all
from tests.gateway.inproc import WAIT_S, eventually
from workers.fake.server import FakeServer, build_app
from workers.relay import EngineRelay

pytestmark = pytest.mark.anyio

SECRET = "s3cret-for-this-test"
ROUTES = ["/v1/chat/completions", "/v1/models", "/invocations", "/tokenize", "/pooling"]
ROUTES += ["/metrics", "/collective_rpc", "/v1/completions"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Relayed:
    url: str
    port: int
    engine: FakeServer


@contextlib.asynccontextmanager
async def relayed(
    tmp_path: Path, sleep_mode: bool = False, **limits: float
) -> AsyncIterator[Relayed]:
    """The fake engine on a socket (closing idle connections after 0.2 s), the relay before it."""
    engine = FakeServer(["echo"], tokens_per_s=0, ttft_s=0)
    socket = str(tmp_path / "engine.sock")
    app = build_app(engine, sleep_mode)
    config = make_config(app, uds=socket, lifespan="off", timeout_keep_alive=0.2)
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done(), "the engine to start")
    relay = EngineRelay(SECRET, socket, HttpLimits(**limits))  # type: ignore[arg-type]
    port = await relay.start("127.0.0.1", 0)
    try:
        yield Relayed(f"http://127.0.0.1:{port}", port, engine)
    finally:
        await relay.stop()
        server.should_exit = True
        await task


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {SECRET}", "Bearer"])
async def test_every_route_is_refused_without_the_secret(
    tmp_path: Path, authorization: str | None
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    async with relayed(tmp_path) as relay, httpx.AsyncClient(headers=headers) as http:
        for path in ROUTES:
            for method in ("GET", "POST", "OPTIONS"):
                response = await http.request(method, relay.url + path, json=body)
                assert response.status_code == 401, (method, path)
                assert response.json()["error"]["code"] == "invalid_engine_secret"
        for method in ("POST", "OPTIONS"):  # /health: GET only, as probes ask
            assert (await http.request(method, relay.url + "/health")).status_code == 401
        assert (await http.get(relay.url + "/health?verbose=1")).status_code == 401
        with_body = await http.request("GET", relay.url + "/health", content=b"x")
        assert with_body.status_code == 401
        assert (await http.get(relay.url + "/health")).status_code == 200  # open, says nothing
        assert relay.engine.finished == 0 and relay.engine.generated == 0


async def test_with_the_secret_everything_passes_through(tmp_path: Path) -> None:
    async with relayed(tmp_path) as relay:
        client = openai.AsyncOpenAI(base_url=f"{relay.url}/v1", api_key=SECRET, max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        reply = await client.chat.completions.create(
            model="echo",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=4,
        )
        assert reply.choices[0].message.content == " tok0 tok1 tok2 tok3"
        stream = await client.completions.create(
            model="echo", prompt="hi", max_tokens=3, stream=True
        )
        assert "".join([c.choices[0].text async for c in stream]) == " tok0 tok1 tok2"
        headers = {"authorization": f"Bearer {SECRET}"}
        async with httpx.AsyncClient(base_url=relay.url, headers=headers) as http:
            # a chunked upload, framed again by the relay; then more requests on the same
            # connection, one of them after the engine closed its idle end (0.2 s)
            async def body() -> AsyncIterator[bytes]:
                yield b'{"model": "echo", "prompt": "hi",'
                yield b' "max_tokens": 2}'

            chunked = await http.post("/v1/completions", content=body())
            assert chunked.json()["choices"][0]["text"] == " tok0 tok1"
            assert "vllm:num_requests_running" in (await http.get("/metrics")).text
            await asyncio.sleep(0.5)
            assert (await http.get("/health")).status_code == 200
            assert (await http.head("/health")).status_code == 405  # see workers/relay.py
        await client.close()


async def test_the_engines_dev_routes_are_refused_even_with_the_secret(tmp_path: Path) -> None:
    """vLLM's sleep mode needs VLLM_SERVER_DEV_MODE=1, which opens its dev routes: the
    relay refuses them to every client (the fake engine serves /sleep, /wake_up and
    /is_sleeping as vLLM does; the agent reaches the engine's socket itself)."""
    headers = {"authorization": f"Bearer {SECRET}"}
    async with (
        relayed(tmp_path, sleep_mode=True) as relay,
        httpx.AsyncClient(base_url=relay.url, headers=headers) as http,
    ):
        for target in [
            "/sleep?level=1",
            "/wake_up",
            "/is_sleeping",
            "/collective_rpc",
            "/server_info",
            "/release_kv_cache_memory",
            "/%73leep",  # as the engine's router decodes it
            "/sleep/",
            f"{relay.url}/sleep",  # absolute form
        ]:
            response = await http.post(target)
            assert response.status_code == 403, target
            assert response.json()["error"]["code"] == "engine_route_forbidden"
        assert not relay.engine.asleep
        reply = await http.post("/v1/completions", json={"model": "echo", "prompt": "hi"})
        assert reply.status_code == 200  # the secret's holder still gets its answers
        # the agent's own way in, the engine's socket, is open: asleep, generations fail
        engine = httpx.AsyncHTTPTransport(uds=str(tmp_path / "engine.sock"))
        async with httpx.AsyncClient(transport=engine, base_url="http://engine") as agent:
            assert (await agent.post("/sleep?level=1")).json()["status"] == "sleeping"
            assert (await agent.get("/is_sleeping")).json() == {"is_sleeping": True}
            asleep = await http.post("/v1/completions", json={"model": "echo", "prompt": "hi"})
            assert asleep.status_code == 503
            assert (await agent.post("/wake_up")).json()["status"] == "awake"


async def test_a_relay_has_the_limits_of_every_server(tmp_path: Path) -> None:
    async with relayed(tmp_path, header_timeout_s=0.5, max_header_bytes=65536) as relay:
        headers = {"authorization": f"Bearer {SECRET}", "x-big": "a" * 1_000_000}
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{relay.url}/health", headers=headers)).status_code == 431
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        answer = await asyncio.wait_for(read_all(reader), WAIT_S)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        writer.close()


async def test_the_lora_endpoints_are_refused_even_with_the_secret(tmp_path: Path) -> None:
    """They register any path on the engine's disk: only the agent, on the engine's own
    socket, calls them (workers/adapters.py)."""
    headers = {"authorization": f"Bearer {SECRET}"}
    async with relayed(tmp_path) as relay, httpx.AsyncClient(headers=headers) as http:
        for path in (
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/adapters",
            "/adapters/x",
            "/v1/load%5Flora_adapter",  # (the engine's router matches the decoded path)
        ):
            body = {"lora_name": "x", "lora_path": "/etc", "name": "x", "src": "/etc"}
            response = await http.post(relay.url + path, json=body)
            assert response.status_code == 403, path
            assert response.json()["error"]["code"] == "engine_route_forbidden"
        assert (await http.get(relay.url + "/v1/models")).status_code == 200
