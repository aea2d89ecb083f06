"""The gateway's side of the KV events: one stream per worker, survived when it misbehaves.

A stand-in for a worker's agent (aiohttp on loopback) serves ``/kv/events`` as the agent
does, and then stops talking, closes, sends garbage or goes away; the gateway's follower
(gateway/kvindex.py) must reconnect and hold what the newest snapshot says. The agent
itself is tested in tests/workers/test_kvevents.py, with vLLM in
tests/test_kv_routing_vllm.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from fleetserve import constants
from fleetserve.kvblocks import KvMessage, KvMessageType, encode_lines
from fleetserve.protocol import RouteTable, WorkerView
from gateway.kvindex import KvEvents, KvIndex
from gateway.table import RoutingTable
from tests.gateway.inproc import eventually

SECRET = "worker-secret"


class FakeAgent:
    """Serves a snapshot of ``keys`` to each connection, then whatever ``then`` says."""

    def __init__(self) -> None:
        self.keys = [1, 2, 3]
        self.then = "stay"  # stay | close | garbage | stall
        self.connections = 0
        self.refused = 0
        self.live: list[web.StreamResponse] = []

    async def events(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {SECRET}":
            self.refused += 1
            return web.Response(status=401)
        self.connections += 1
        response = web.StreamResponse()
        await response.prepare(request)
        snapshot = KvMessage(type=KvMessageType.SNAPSHOT, keys=self.keys, block_size=16)
        await response.write(encode_lines([snapshot]))
        if self.then == "garbage":
            await response.write(b'{"type": "stored", "keys": "not a list"}\n')
        elif self.then == "stay":
            self.live.append(response)
        if self.then in ("stay", "stall"):
            await asyncio.sleep(3600)  # stall: says nothing more, not even a ping
        return response  # close (and garbage): the stream ends

    async def send(self, message: KvMessage) -> None:
        for response in self.live:
            await response.write(encode_lines([message]))


@contextlib.asynccontextmanager
async def agent_and_gateway(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[FakeAgent, KvEvents, web.AppRunner, str]]:
    monkeypatch.setattr(constants, "KV_STREAM_DEAD_S", 0.5)
    monkeypatch.setattr(constants, "KV_RECONNECT_S", 0.05)
    monkeypatch.setattr(constants, "KV_RECONNECT_MAX_S", 0.2)
    agent = FakeAgent()
    app = web.Application()
    app.router.add_get("/kv/events", agent.events)

    async def no_tokenizer(_: web.Request) -> web.Response:
        return web.json_response({"files": {}})

    app.router.add_get("/kv/tokenizer", no_tokenizer)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    kv = KvEvents()
    async with aiohttp.ClientSession() as session:
        kv.session = session
        try:
            yield agent, kv, runner, f"http://127.0.0.1:{port}"
        finally:
            await kv.close()
            await runner.cleanup()


def _table(url: str | None, version: int = 1) -> tuple[RouteTable, RoutingTable]:
    workers = []
    if url is not None:
        workers.append(
            WorkerView(
                worker_id="w1",
                model_names=["m"],
                base_url="http://127.0.0.1:1/v1",
                engine="vllm",
                capacity=8,
                engine_secret=SECRET,
                kv_events_url=url,
                last_heartbeat_age_s=0,
            )
        )
    table = RouteTable(epoch="e", version=version, workers=workers)
    return table, RoutingTable(table)


def _held(kv: KvEvents) -> set[int]:
    return set(kv.index._held.get("w1", ()))


@pytest.mark.anyio
async def test_the_gateway_follows_a_stream_that_breaks_every_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with agent_and_gateway(monkeypatch) as (agent, kv, runner, url):
        kv.update(*_table(url))  # kv_events is the default for a worker publishing events
        await eventually(lambda: _held(kv) == {1, 2, 3}, "the snapshot")
        await agent.send(KvMessage(type=KvMessageType.STORED, keys=[4]))
        await agent.send(KvMessage(type=KvMessageType.REMOVED, keys=[1]))
        await eventually(lambda: _held(kv) == {2, 3, 4}, "the changes")
        assert kv.index.block_size["w1"] == 16

        for then, keys in (("stall", [5]), ("garbage", [6, 7]), ("close", [8]), ("stay", [9])):
            before = agent.connections
            agent.then, agent.keys = then, keys
            for response in agent.live:  # the last stream ends: the gateway comes back
                with contextlib.suppress(ConnectionError):
                    await response.write_eof()
            agent.live.clear()
            await eventually(lambda b=before: agent.connections > b, f"a reconnection ({then})")
            await eventually(lambda k=keys: _held(kv) == set(k), f"the new snapshot ({then})")
        assert kv.reconnects >= 4 and kv.bad_lines >= 1

        # the agent goes away for a while (refused connections), then comes back
        await runner.cleanup()
        await asyncio.sleep(0.3)
        assert _held(kv) == {9}  # meanwhile, routing goes on with what it knew
        assert not kv._streams["w1"][1].done()


@pytest.mark.anyio
async def test_the_stream_needs_the_secret_and_a_worker_gone_is_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with agent_and_gateway(monkeypatch) as (agent, kv, _, url):
        table, routes = _table(url)
        wrong = table.model_copy(
            update={"workers": [table.workers[0].model_copy(update={"engine_secret": "nope"})]}
        )
        kv.update(wrong, RoutingTable(wrong))
        await eventually(lambda: agent.refused >= 2, "refusals")
        assert not _held(kv)
        kv.update(table, routes)  # the right secret: a new stream
        await eventually(lambda: _held(kv) == {1, 2, 3}, "the snapshot")
        kv.update(*_table(None, version=2))
        assert not _held(kv) and not kv._streams


def test_a_worker_holds_the_leading_blocks_it_has_and_what_was_just_sent() -> None:
    index = KvIndex()
    index.replace("a", [10, 11, 12], 16)
    assert index.matched("a", [10, 11, 99, 12], now=0.0) == 2
    assert index.matched("b", [10], now=0.0) == 0
    index.note_sent("b", [10, 11], now=0.0)
    assert index.matched("b", [10, 11, 12], now=1.0) == 2
    assert index.matched("b", [10, 11], now=constants.KV_PENDING_S + 1) == 0  # expired
    index.note_sent("b", [10], now=0.0)
    index.remove("b", [10])  # the engine evicted it (or never kept it)
    assert index.matched("b", [10], now=1.0) == 0
    index.drop("a")
    assert index.blocks("a") == 0 and index.matched("a", [10], now=0.0) == 0
