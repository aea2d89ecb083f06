"""The engine's KV-cache events, kept and served to gateways by the worker's agent.

vLLM publishes every block it stores or evicts over ZeroMQ (``--kv-events-config``):
three frames (topic, 8-byte sequence, msgpack ``KVEventBatch``), each ``BlockStored``
with the blocks' token ids. ZeroMQ has no authentication, and the events carry every
prompt's tokens, so the engine publishes on an ``ipc://`` socket in a directory only this
user may enter (0700), and the agent is its only subscriber. The agent names each block by
its content (fleetserve/kvblocks.py), keeps the set of blocks the engine holds, and serves
gateways ``GET /kv/events``: that set first, then every change, newline-delimited JSON, on
its own port and only to requests carrying the worker's secret (the one the controller
hands gateways with the routing table). Every gateway subscribes to every worker itself, so
all of them hold the same index with no state shared between them; a gateway started late,
or one whose stream broke, gets the whole set again when it connects.

The agent itself can miss events only if it falls 100,000 messages behind (ZeroMQ's
high-water mark): a gap in the sequence numbers is filled from the engine's replay socket
(its last 10,000 batches); a block whose parent was lost is left out (its prompt is routed
as a miss, never as a false hit). A restarted engine starts empty: so does the set.

``GET /kv/tokenizer`` serves the model's tokenizer files, so a gateway tokenizes requests
as the engine does (gateway/tokenize.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from fleetserve import constants
from fleetserve.errors import error_body
from fleetserve.kvblocks import KvMessage, KvMessageType, block_keys, encode_lines

logger = logging.getLogger(__name__)

# The files a gateway needs to tokenize and render chats as the engine does.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
_END_SEQ = -1  # vLLM's replay socket ends its answer with this sequence number


class BlockIndex:
    """The blocks an engine holds, by content key, built from its events (no I/O)."""

    def __init__(self) -> None:
        self._keys: dict[Any, int] = {}  # the engine's block hash -> our key
        self.block_size: int | None = None
        self.engine_starts = 0
        self.unlinked = 0  # blocks left out: their parent was never seen

    def reset(self) -> KvMessage:
        """A new engine (or a lost thread of events): nothing held; the snapshot to send."""
        self._keys.clear()
        return self.snapshot()

    def snapshot(self) -> KvMessage:
        return KvMessage(
            type=KvMessageType.SNAPSHOT,
            keys=list(self._keys.values()),
            block_size=self.block_size,
            engine_starts=self.engine_starts,
        )

    def __len__(self) -> int:
        return len(self._keys)

    def apply(self, batch: Any) -> list[KvMessage]:
        """A decoded ``KVEventBatch`` (``[ts, events, dp_rank]``): the changes to send, one
        message per run of events of one kind (vLLM sends an eviction per block)."""
        out: list[KvMessage] = []
        for event in batch[1]:
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "BlockStored":
                keys = self._stored(event)
                if keys:
                    out.append(
                        KvMessage(type=KvMessageType.STORED, keys=keys, block_size=self.block_size)
                    )
            elif kind == "BlockRemoved":
                if _primary(event):
                    gone = [self._keys.pop(h) for h in event["block_hashes"] if h in self._keys]
                    if gone:
                        out.append(KvMessage(type=KvMessageType.REMOVED, keys=gone))
            elif kind == "AllBlocksCleared":
                self._keys.clear()
                out.append(KvMessage(type=KvMessageType.CLEARED))
            if len(out) > 1 and out[-1].type is out[-2].type and out[-1].keys:
                out[-2].keys += out.pop().keys
        return out

    def _stored(self, event: dict[str, Any]) -> list[int]:
        hashes = event["block_hashes"]
        size = event["block_size"]
        tokens = event["token_ids"]
        # Blocks keyed by more than their tokens (a LoRA adapter, images, a cache salt) or
        # partial ones: a request's tokens alone cannot name them, so they are left out.
        extra = event.get("extra_keys") or ()
        if (
            not _primary(event)
            or event.get("lora_name") is not None
            or any(e is not None for e in extra)
            or len(tokens) != len(hashes) * size
            or (self.block_size is not None and size != self.block_size)
        ):
            return []
        self.block_size = size
        parent_hash = event.get("parent_block_hash")
        parent = 0 if parent_hash is None else self._keys.get(parent_hash)
        if parent is None:
            self.unlinked += len(hashes)
            return []
        keys = block_keys(tokens, size, parent)
        self._keys.update(zip(hashes, keys, strict=True))
        return keys


def _primary(event: dict[str, Any]) -> bool:
    """The engine's own cache (not an offloading tier), first KV-cache group."""
    return event.get("medium") in (None, "GPU") and event.get("group_idx") in (None, 0)


class KvEventService:
    """Subscribes to the engine's events and serves them to gateways; one per agent."""

    def __init__(self, socket_dir: Path, secret: str, model_dir: Path | None) -> None:
        self.endpoint = f"ipc://{socket_dir / 'kv-events'}"
        self.replay_endpoint = f"ipc://{socket_dir / 'kv-replay'}"
        self._secret = secret.encode()
        self._model_dir = model_dir
        self.index = BlockIndex()
        self._subscribers: set[asyncio.Queue[KvMessage | None]] = set()
        self._last_seq: int | None = None
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    def engine_config(self) -> str:
        """The engine's ``--kv-events-config``."""
        return json.dumps(
            {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": self.endpoint,
                "replay_endpoint": self.replay_endpoint,
                "topic": "kv",
            }
        )

    async def start(self, host: str, port: int = 0) -> int:
        """Subscribe, and serve gateways on ``host``:``port`` (0: a free port); the port."""
        app = web.Application()
        app.router.add_get("/kv/events", self._events)
        app.router.add_get("/kv/tokenizer", self._tokenizer)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        # (the runner's addresses, not the site's server: under uvloop, which the agent runs
        # on, that is a uvloop.loop.Server, no asyncio.Server)
        self.port = int(self._runner.addresses[0][1])
        self._task = asyncio.create_task(self._subscribe())
        logger.info("KV events for gateways on %s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in list(self._subscribers):
            _offer(queue, None)
        if self._runner is not None:
            await self._runner.cleanup()

    def engine_started(self) -> None:
        """A new engine process: its cache is empty and its sequence numbers start again."""
        self.index.engine_starts += 1
        self._last_seq = None
        self._broadcast([self.index.reset()])

    # -- the engine's side ----------------------------------------------------------

    async def _subscribe(self) -> None:
        import msgspec
        import zmq
        import zmq.asyncio

        decoder = msgspec.msgpack.Decoder()
        context = zmq.asyncio.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.endpoint)  # ZeroMQ connects when the engine binds, and again after
        try:
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                try:
                    expected = None if self._last_seq is None else self._last_seq + 1
                    if expected is not None and seq > expected:
                        await self._replay(context, decoder, expected, seq)
                    if self._last_seq is None or seq > self._last_seq:
                        self._apply(seq, decoder.decode(frames[2]))
                except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
                    logger.warning("unreadable KV event batch %d: %s", seq, exc)
        finally:
            sub.close(linger=0)
            context.term()

    def _apply(self, seq: int, batch: Any) -> None:
        self._last_seq = seq
        self._broadcast(self.index.apply(batch))

    async def _replay(self, context: Any, decoder: Any, start: int, stop: int) -> None:
        """Batches ``start``..``stop - 1``, missed, from the engine's replay socket."""
        import zmq

        logger.warning("KV events %d..%d missed: asking the engine again", start, stop - 1)
        dealer = context.socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            async with asyncio.timeout(constants.KV_REPLAY_TIMEOUT_S):
                while True:
                    frames = await dealer.recv_multipart()
                    seq = int.from_bytes(frames[2], "big", signed=True)
                    if seq == _END_SEQ:
                        break
                    if start <= seq < stop and seq > (self._last_seq or -1):
                        self._apply(seq, decoder.decode(frames[3]))
        except TimeoutError:
            logger.warning("the engine's replay did not answer; blocks may be missing")
        finally:
            dealer.close(linger=0)
        if self._last_seq is None or self._last_seq < stop - 1:
            # lost for good: whatever followed the lost blocks is unlinked; start again clean
            logger.warning("KV events lost for good: the index starts again from empty")
            self._broadcast([self.index.reset()])

    def _broadcast(self, messages: list[KvMessage]) -> None:
        for message in messages:
            for queue in list(self._subscribers):
                if not _offer(queue, message):
                    self._subscribers.discard(queue)  # too slow: it reconnects for a snapshot
                    _offer(queue, None, force=True)

    # -- the gateways' side ---------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), self._secret)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return _unauthorized()
        queue: asyncio.Queue[KvMessage | None] = asyncio.Queue(constants.KV_STREAM_QUEUE)
        snapshot = self.index.snapshot()  # and subscribed in the same step: nothing between
        self._subscribers.add(queue)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            await response.prepare(request)
            await response.write(encode_lines([snapshot]))
            while True:
                try:
                    async with asyncio.timeout(constants.KV_STREAM_PING_S):
                        message = await queue.get()
                except TimeoutError:
                    message = KvMessage(type=KvMessageType.PING)
                if message is None:
                    break
                await response.write(encode_lines([message]))
        except (ConnectionError, RuntimeError):
            pass  # the gateway went away
        finally:
            self._subscribers.discard(queue)
        return response

    async def _tokenizer(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized()
        files = {}
        if self._model_dir is not None:
            for name in TOKENIZER_FILES:
                path = self._model_dir / name
                if path.is_file():
                    files[name] = await asyncio.to_thread(path.read_text)
        body = {"files": files, "block_size": self.index.block_size}
        return web.Response(body=orjson.dumps(body), content_type="application/json")


def _offer(
    queue: asyncio.Queue[KvMessage | None], item: KvMessage | None, force: bool = False
) -> bool:
    """Put ``item`` without waiting; False when full (``force``: make room first)."""
    if force:
        while queue.full():
            queue.get_nowait()
    try:
        queue.put_nowait(item)
    except asyncio.QueueFull:
        return False
    return True


def _unauthorized() -> web.Response:
    body = error_body(
        401, "the KV event stream answers this worker's gateways only", "invalid_engine_secret"
    )
    return web.Response(
        status=401,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"WWW-Authenticate": 'Bearer realm="fleetserve"'},
    )
