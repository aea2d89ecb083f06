"""The agent's side of the KV events: vLLM's batches in, blocks named by content out.

The batches are vLLM 0.32's wire format (``KVEventBatch`` as msgpack: ``[ts, events,
dp_rank]``, each event a map tagged by ``type``), sent over a real ZeroMQ socket; what
vLLM itself publishes is checked in tests/test_kv_routing_vllm.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest
import zmq
import zmq.asyncio

from fleetserve.kvblocks import block_keys
from tests.gateway.inproc import eventually
from workers.kvevents import BlockIndex, KvEventService

pytestmark = pytest.mark.anyio

SECRET = "s3cret"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def stored(
    hashes: list[Any], parent: Any, tokens: list[int], size: int = 4, **extra: Any
) -> dict[str, Any]:
    event = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": size,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    return event | extra


def removed(hashes: list[Any]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


def batch(*events: dict[str, Any]) -> list[Any]:
    return [1.0, list(events), 0]


def test_blocks_are_named_by_their_tokens_and_chained_by_parent() -> None:
    index = BlockIndex()
    tokens = list(range(12))
    (message,) = index.apply(batch(stored([b"h1", b"h2"], None, tokens[:8])))
    assert message.keys == block_keys(tokens[:8], 4) and message.block_size == 4
    # a later event continues the chain from its parent's hash
    (message,) = index.apply(batch(stored([b"h3"], b"h2", tokens[8:])))
    assert message.keys == block_keys(tokens, 4)[2:]
    assert sorted(index.snapshot().keys) == sorted(block_keys(tokens, 4))
    (message,) = index.apply(batch(removed([b"h1", b"unknown"])))
    assert message.keys == block_keys(tokens, 4)[:1]
    assert len(index) == 2
    (message,) = index.apply(batch({"type": "AllBlocksCleared"}))
    assert message.type == "cleared" and len(index) == 0


def test_blocks_the_tokens_cannot_name_are_left_out() -> None:
    index = BlockIndex()
    tokens = list(range(4))
    assert index.apply(batch(stored([1], None, tokens, lora_name="adapter"))) == []
    assert index.apply(batch(stored([2], None, tokens, extra_keys=[("salt",)]))) == []
    assert index.apply(batch(stored([3], None, tokens, medium="CPU"))) == []  # offloaded tier
    assert index.apply(batch(stored([4], 999, tokens))) == []  # parent never seen
    assert index.unlinked == 1
    assert index.apply(batch({"type": "SomethingNew"}, removed([5]))) == []
    assert len(index) == 0


@contextlib.asynccontextmanager
async def service(
    engine_starts: int = 1,
) -> AsyncIterator[tuple[KvEventService, zmq.asyncio.Socket, str]]:
    """The agent's service, and a PUB socket where the engine would publish."""
    with tempfile.TemporaryDirectory() as tmp:
        kv = KvEventService(Path(tmp), SECRET, None)
        context = zmq.asyncio.Context()
        pub = context.socket(zmq.PUB)
        pub.bind(kv.endpoint)
        port = await kv.start("127.0.0.1")
        for _ in range(engine_starts):
            kv.engine_started()
        try:
            yield kv, pub, f"http://127.0.0.1:{port}"
        finally:
            await kv.stop()
            pub.close(linger=0)
            context.term()


async def publish(pub: zmq.asyncio.Socket, seq: int, payload: list[Any]) -> None:
    await pub.send_multipart([b"kv", seq.to_bytes(8, "big"), msgspec.msgpack.encode(payload)])


async def test_gateways_get_a_snapshot_then_the_changes_with_the_secret_only() -> None:
    async with service() as (kv, pub, url), httpx.AsyncClient(timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            assert (await http.get(f"{url}/kv/events", headers=headers)).status_code == 401
            assert (await http.get(f"{url}/kv/tokenizer", headers=headers)).status_code == 401

        # ZeroMQ's subscriber joins asynchronously: publish until the agent has seen one
        async def seen() -> bool:
            await publish(pub, 0, batch(stored([b"a"], None, [1, 2, 3, 4])))
            return len(kv.index) == 1

        await eventually(seen, "the agent subscribed")
        auth = {"Authorization": f"Bearer {SECRET}"}
        async with http.stream("GET", f"{url}/kv/events", headers=auth) as stream:
            lines = stream.aiter_lines()
            snapshot = orjson.loads(await anext(lines))
            assert snapshot == {
                "type": "snapshot",
                "keys": block_keys([1, 2, 3, 4], 4),
                "block_size": 4,
                "engine_starts": 1,
            }
            await publish(pub, 1, batch(stored([b"b"], b"a", [5, 6, 7, 8])))
            assert orjson.loads(await anext(lines))["keys"] == block_keys(range(1, 9), 4)[1:]
            await publish(pub, 2, batch(removed([b"a"])))
            assert orjson.loads(await anext(lines)) == {
                "type": "removed",
                "keys": block_keys([1, 2, 3, 4], 4),
            }
            kv.engine_started()  # a new engine: empty, and its sequence starts again
            assert orjson.loads(await anext(lines)) == {
                "type": "snapshot",
                "engine_starts": 2,
                "block_size": 4,
            }
            await publish(pub, 0, batch(stored([b"c"], None, [9, 9, 9, 9])))
            assert orjson.loads(await anext(lines))["type"] == "stored"


async def test_a_gap_in_the_sequence_is_filled_from_the_replay_socket() -> None:
    async with service() as (kv, pub, _):
        replay = pub.context.socket(zmq.ROUTER)
        replay.bind(kv.replay_endpoint)
        try:

            async def seen() -> bool:
                await publish(pub, 0, batch(stored([b"a"], None, [1, 2, 3, 4])))
                return len(kv.index) == 1

            await eventually(seen, "the agent subscribed")

            async def engine_replays() -> None:  # as vLLM's publisher answers
                client, _, start = await replay.recv_multipart()
                assert int.from_bytes(start, "big") == 1
                payload = msgspec.msgpack.encode(batch(stored([b"b"], b"a", [5, 6, 7, 8])))
                await replay.send_multipart([client, b"", b"kv", (1).to_bytes(8, "big"), payload])
                await replay.send_multipart(
                    [client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
                )

            answering = asyncio.create_task(engine_replays())
            await publish(pub, 2, batch(stored([b"c"], b"b", [9, 10, 11, 12])))  # 1 was lost
            await eventually(lambda: len(kv.index) == 3, "the lost batch replayed")
            await answering
            assert sorted(kv.index.snapshot().keys) == sorted(block_keys(range(1, 13), 4))
        finally:
            replay.close(linger=0)
