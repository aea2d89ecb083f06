"""The limits of fleetserve's HTTP servers (fleetserve/http.py), on a real uvicorn on loopback.

Raw sockets play the clients a real client library would never be: silent, a byte at a
time, a 1 MB header, one that reads nothing. Each server here has short limits so that
the tests wait fractions of a second; the red-team module (tests/test_security.py) runs
the same attacks against the real processes with their settings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from fleetserve.http import EmbeddedServer, HttpLimits, LimitedConfig, make_config
from tests.gateway.inproc import WAIT_S, eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class App:
    """/ answers ok; /body counts a body; /wait waits for ``gate``; /stream sends 256 MB."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    bodies: list[int] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(4096):  # uvicorn's send returns at once once the client is gone
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
                await asyncio.sleep(0)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path == "/body":
            self.bodies.append(len(body))
        if path == "/wait":
            await self.gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@dataclass
class Served:
    url: str
    port: int
    config: LimitedConfig


@contextlib.asynccontextmanager
async def serving(app: Any, **limits: Any) -> AsyncIterator[Served]:
    config = make_config(app, port=0, limits=HttpLimits(**limits), lifespan="off", graceful_s=1)
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done(), "the server to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served(f"http://127.0.0.1:{port}", port, config)
    finally:
        server.should_exit = True
        await task


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes (a reset after an answer counts as the end)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def test_a_silent_connection_is_cut_at_the_deadline_while_others_are_served() -> None:
    async with serving(App(), header_timeout_s=0.5) as served:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        async with httpx.AsyncClient() as http:
            assert (await http.get(served.url)).text == "ok"
        answer = await asyncio.wait_for(read_all(reader), WAIT_S)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"code":"header_timeout"' in answer
        assert loop.time() - started >= 0.5  # not before its time
        writer.close()


async def test_a_slow_loris_client_is_cut_at_the_deadline() -> None:
    async with serving(App(), header_timeout_s=1.0) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 1000

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in head:  # one byte every 50 ms: the head would take 50 s
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        answer = await asyncio.wait_for(read_all(reader), WAIT_S)
        sender.cancel()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        writer.close()


async def test_a_1mb_header_gets_431_and_the_server_goes_on() -> None:
    async with serving(App(), max_header_bytes=64 * 1024) as served, httpx.AsyncClient() as http:
        refused = await http.get(served.url, headers={"x-big": "a" * 1_000_000})
        assert refused.status_code == 431
        assert refused.json()["error"]["code"] == "headers_too_large"
        assert (await http.get(served.url, headers={"x-fine": "a" * 30_000})).text == "ok"


async def test_a_trickled_body_is_cut_and_a_steady_one_is_not() -> None:
    app = App()
    async with serving(app, body_timeout_s=0.5, body_min_bytes_per_s=500) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(1000):  # a byte every 50 ms: 20 B/s
                    writer.write(b"a")
                    await writer.drain()
                    await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        assert await asyncio.wait_for(read_all(reader), WAIT_S) == b""  # closed, no answer
        sender.cancel()
        writer.close()

        # 40 KB in 1.6 s (25 KB/s, well over the minimum rate): past the first 0.5 s, received
        async def steady() -> Any:
            for _ in range(40):
                yield b"a" * 1000
                await asyncio.sleep(0.04)

        async with httpx.AsyncClient() as http:
            assert (await http.post(f"{served.url}/body", content=steady())).text == "ok"
        assert app.bodies == [40_000]


async def test_a_client_that_reads_nothing_is_cut() -> None:
    async with serving(App(), write_stall_timeout_s=0.5) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: served.config.slots.count == 0, "the server to cut the reader")
        received = await asyncio.wait_for(read_all(reader), WAIT_S)  # buffers, then the end
        assert received.startswith(b"HTTP/1.1 200")
        writer.close()


async def test_past_the_cap_idle_connections_make_room_for_real_clients() -> None:
    app = App()
    async with serving(app, max_connections=4, header_timeout_s=60) as served:
        slots = served.config.slots
        idle = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(4)]
        await eventually(lambda: slots.count == 4, "four connections held")
        async with httpx.AsyncClient() as http:
            assert (await http.get(served.url)).text == "ok"  # the oldest idle one made room
        assert await asyncio.wait_for(idle[0][0].read(), WAIT_S) == b""
        assert slots.count <= 4

        # All busy: a request under way is never cut for a newcomer; the newcomer is refused.
        limits = httpx.Limits(max_connections=10)
        async with httpx.AsyncClient(limits=limits, timeout=WAIT_S) as http:
            waiting = [asyncio.create_task(http.get(f"{served.url}/wait")) for _ in range(4)]
            await eventually(lambda: not slots.idle and slots.count == 4, "four requests held")
            with pytest.raises(httpx.TransportError):
                await http.get(served.url)
            app.gate.set()
            assert [(await task).text for task in waiting] == ["ok"] * 4
        for _, writer in idle:
            writer.close()
