"""The gateway's upstream client against small HTTP servers on loopback."""

from __future__ import annotations

import asyncio

import pytest

from gateway.upstream import UpstreamError, UpstreamPool

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _serve(handler) -> tuple[asyncio.Server, int]:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


@pytest.mark.parametrize("pause_s", [0.0, 0.01])
def test_keep_alive_reuses_one_connection_and_survives_a_stale_one(pause_s: float) -> None:
    """With no pause the next request is written into a connection the server is closing."""

    async def scenario() -> None:
        connections = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            for _ in range(
                2
            ):  # two answers per connection, then close as a keep-alive timeout would
                request = await _read_request(reader)
                assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
                assert request.endswith(b'{"model": "m"}')
                writer.write(OK)
                await writer.drain()
            writer.close()

        server, port = await _serve(handler)
        pool = UpstreamPool()
        for _ in range(5):
            response = await pool.post("127.0.0.1", port, "/v1/chat/completions", b'{"model": "m"}')
            assert (response.status, response.content_type) == (200, "application/json")
            assert await response.read() == b"{}"
            response.release()
            await asyncio.sleep(pause_s)
        assert connections == 3  # reused while the server allowed, reconnected when it closed
        pool.close()
        server.close()

    asyncio.run(scenario())


def test_chunked_stream_arrives_in_pieces_and_close_aborts() -> None:
    async def scenario() -> None:
        server_saw_close = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for i in range(3):
                data = f"data: {i}\n\n".encode()
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
            await reader.read()  # until the client goes away
            server_saw_close.set()

        server, port = await _serve(handler)
        pool = UpstreamPool()
        response = await pool.post("127.0.0.1", port, "/v1/completions", b"{}")
        assert response.content_type == "text/event-stream"
        chunks = [await response.next_chunk() for _ in range(3)]
        assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        response.close()
        await asyncio.wait_for(server_saw_close.wait(), 5)
        server.close()

    asyncio.run(scenario())


def test_refused_and_broken_connections_raise_upstream_error() -> None:
    async def scenario() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            await writer.drain()
            writer.close()

        server, port = await _serve(hang_up)
        pool = UpstreamPool()
        response = await pool.post("127.0.0.1", port, "/x", b"{}")
        with pytest.raises(UpstreamError):
            await response.read()
        server.close()
        await server.wait_closed()
        with pytest.raises(UpstreamError, match="cannot connect"):
            await pool.post("127.0.0.1", port, "/x", b"{}")

    asyncio.run(scenario())
