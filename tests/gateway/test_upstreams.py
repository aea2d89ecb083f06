"""Attached servers as the gateway sees them, in-process: their own name for the model (the
gateway rewrites `model` only for them), their API key, which each gateway reads from its
own secrets (never from the routing table), and HTTPS (a hosted provider; here a loopback
server with a certificate of a test CA that the gateway is told to trust). The agent side,
with real servers started outside fleetserve, is in tests/workers/test_attached.py and
tests/test_api_vllm.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import trustme

from fleetserve.protocol import Registration
from tests.gateway.inproc import InProcessCluster, LoopbackServer
from workers.fake.server import FakeServer
from workers.fake.server import build_app as build_engine_app

pytestmark = pytest.mark.anyio

SECRET = "sk-upstream-0123456789"


@contextlib.asynccontextmanager
async def attached(
    cluster: InProcessCluster, worker_id: str, url: str, **registration: object
) -> AsyncIterator[None]:
    await cluster.register(
        Registration(
            worker_id=worker_id,
            model_names=["local-name", "local-alias"],
            base_url=f"{url}/v1",
            engine="openai",
            capacity=4,
            endpoints=["/v1/chat/completions", "/v1/audio/transcriptions"],
            **registration,  # type: ignore[arg-type]
        )
    )
    await cluster.settle()
    try:
        yield
    finally:
        await cluster.deregister(worker_id)
        await cluster.settle()


async def test_the_model_is_renamed_for_a_server_that_knows_it_by_another_name(
    cluster: InProcessCluster,
) -> None:
    engine = FakeServer(["its-own-name"], tokens_per_s=0, ttft_s=0)  # 404 for any other name
    server = LoopbackServer(build_engine_app(engine))
    url = await server.start()
    try:
        async with (
            attached(cluster, "renamed-0", url, upstream_model="its-own-name"),
            cluster.gateway() as gateway,
        ):
            client = gateway.client()
            for name in ("local-name", "local-alias"):
                reply = await client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
                assert reply.choices[0].message.content == " tok0 tok1"
                assert reply.model == "its-own-name"  # the engine's answer, as it gave it
            audio = await client.audio.transcriptions.create(
                model="local-name", file=("a.wav", b"abc")
            )
            assert audio.text == "3 bytes of a.wav (transcriptions)"
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def recording_engine() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback engine that records each request's head and answers a tiny chat answer."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        body = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", heads


async def test_the_key_of_a_server_reaches_it_from_the_gateways_own_secrets(
    cluster: InProcessCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "UPSTREAM_TEST").write_text(SECRET + "\n")
    messages = [{"role": "user", "content": "hi"}]
    caplog.set_level(logging.DEBUG)
    async with (
        recording_engine() as (url, heads),
        attached(cluster, "keyed-0", url, upstream_key="UPSTREAM_TEST"),
    ):
        table = (await cluster.http.get("/workers")).text
        assert "UPSTREAM_TEST" in table and SECRET not in table  # the name travels, not the key
        async with cluster.gateway(secrets_dir=str(tmp_path)) as gateway:
            raw = await gateway.client("sk-client").chat.completions.with_raw_response.create(
                model="local-name",
                messages=messages,  # type: ignore[arg-type]
            )
            assert raw.parse().choices[0].message.content == "ok"
            assert SECRET not in str(raw.headers) and SECRET.encode() not in raw.content
        (head,) = heads
        # the server's key, in place of the client's (which the gateway keeps to itself)
        assert f"Authorization: Bearer {SECRET}".encode() in head
        assert b"sk-client" not in head
        async with cluster.gateway() as lacking:  # no such secret here: not routed to it
            with pytest.raises(openai.InternalServerError) as unavailable:
                await lacking.client().chat.completions.create(
                    model="local-name",
                    messages=messages,  # type: ignore[arg-type]
                )
            assert unavailable.value.status_code == 503 and len(heads) == 1
    assert "needs the secret UPSTREAM_TEST" in caplog.text
    assert SECRET not in caplog.text


async def test_an_https_server_is_reached_over_tls(
    cluster: InProcessCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    certificate.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # read by OpenSSL
    engine = FakeServer(["local-name"], tokens_per_s=0, ttft_s=0)
    server = LoopbackServer(
        build_engine_app(engine),
        ssl_certfile=str(tmp_path / "server.pem"),
        ssl_keyfile=str(tmp_path / "server.pem"),
    )
    url = await server.start()
    assert url.startswith("https://")
    try:
        async with attached(cluster, "tls-0", url), cluster.gateway() as gateway:
            client = gateway.client()
            for stream in (False, True):
                raw = await client.chat.completions.with_raw_response.create(
                    model="local-name",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=3,
                    stream=stream,
                )
                assert raw.headers["x-fleetserve-worker"] == "tls-0"
        assert engine.finished == 2
    finally:
        await server.stop()
