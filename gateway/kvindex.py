"""Which engine holds which KV-cache blocks, as this gateway knows it from the engines' events.

Every gateway follows every worker's event stream itself (workers/kvevents.py: a snapshot,
then each change), so all gateways hold the same index and share nothing. Convergence: a
gateway that starts late, or whose stream broke or stalled (nothing, not even a ping, for
KV_STREAM_DEAD_S), reconnects and the snapshot it gets replaces what it had: it holds the
engine's state again as soon as that snapshot arrives. A restarted engine sends an empty
snapshot; a worker gone from the routing table is dropped. A stream that sends garbage is
closed and opened again. Until then the gateway routes on what it last knew.

On top of the engines' word, each gateway notes the blocks of the requests it sent itself
for KV_PENDING_S (the engine publishes them once it has computed them, which takes a
prefill): a burst of requests sharing a new prefix goes to one engine, not to all.

Memory: about 150 bytes per block per worker holding it (a 64-bit key in two sets).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import aiohttp
import orjson
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from fleetserve import constants
from fleetserve.kvblocks import KvMessage, KvMessageType
from fleetserve.protocol import RouteTable, WorkerState, WorkerView
from gateway.tokenize import PromptTokenizer

if TYPE_CHECKING:
    from gateway.table import RoutingTable

logger = logging.getLogger(__name__)


class KvIndex:
    """Blocks by key -> the workers holding them, and the reverse (no I/O)."""

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._held: dict[str, set[int]] = {}
        #: worker_id -> its engine's tokens per block (known from its events)
        self.block_size: dict[str, int] = {}
        #: worker_id -> block key -> until when this gateway counts it as held (sent by us)
        self._pending: dict[str, dict[int, float]] = {}

    def replace(self, worker_id: str, keys: Iterable[int], block_size: int | None) -> None:
        """A snapshot: exactly ``keys`` are held by the worker."""
        self.drop(worker_id)
        if block_size is not None:
            self.block_size[worker_id] = block_size
        self.store(worker_id, keys)

    def store(self, worker_id: str, keys: Iterable[int]) -> None:
        held = self._held.setdefault(worker_id, set())
        pending = self._pending.get(worker_id)
        for key in keys:
            held.add(key)
            self._holders.setdefault(key, set()).add(worker_id)
            if pending:
                pending.pop(key, None)

    def remove(self, worker_id: str, keys: Iterable[int]) -> None:
        held = self._held.get(worker_id, set())
        pending = self._pending.get(worker_id)
        for key in keys:
            held.discard(key)
            if pending:
                pending.pop(key, None)
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._holders[key]

    def drop(self, worker_id: str) -> None:
        """Forget the worker's blocks (its engine restarted, or it left)."""
        self.remove(worker_id, list(self._held.pop(worker_id, ())))
        self._pending.pop(worker_id, None)

    def note_sent(self, worker_id: str, keys: list[int], now: float) -> None:
        """This gateway sent a request with these blocks: count them as held for a while."""
        pending = self._pending.setdefault(worker_id, {})
        if len(pending) > constants.KV_PENDING_MAX:
            self._pending[worker_id] = pending = {k: t for k, t in pending.items() if t > now}
        until = now + constants.KV_PENDING_S
        for key in keys:
            pending[key] = until

    def matched(self, worker_id: str, keys: list[int], now: float) -> int:
        """How many leading blocks of ``keys`` the worker holds (or was just sent)."""
        held = self._held.get(worker_id, ())
        pending = self._pending.get(worker_id) or {}
        for i, key in enumerate(keys):
            if key not in held and pending.get(key, 0.0) <= now:
                return i
        return len(keys)

    def blocks(self, worker_id: str) -> int:
        return len(self._held.get(worker_id, ()))

    def workers(self) -> list[str]:
        return list(self._held)


class KvEvents(Collector):
    """The gateway's follower of every worker's KV events, and the models' tokenizers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.index = KvIndex()
        #: What the index's times count in (the gateway's: gateway/clock.py).
        self.clock = clock
        self.session: aiohttp.ClientSession | None = None  # the lifespan opens it
        self._streams: dict[str, tuple[WorkerView, asyncio.Task[None]]] = {}
        #: model -> its tokenizer; None: being fetched or unavailable
        self._tokenizers: dict[str, PromptTokenizer | None] = {}
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self.reconnects = 0
        self.bad_lines = 0

    def tokenizer(self, model: str) -> PromptTokenizer | None:
        return self._tokenizers.get(model)

    # -- following the routing table ----------------------------------------------------

    def update(self, table: RouteTable, routes: RoutingTable) -> None:
        """Follow the ready workers publishing events of models routed by them; drop others."""
        if self.session is None:
            return
        wanted = {
            w.worker_id: w
            for w in table.workers
            if w.kv_events_url
            and w.state is WorkerState.READY
            and getattr(routes.policies.get(w.model_names[0]), "needs_kv_events", False)
        }
        for worker_id, (view, task) in list(self._streams.items()):
            new = wanted.get(worker_id)
            if new is None or (new.kv_events_url, new.engine_secret) != (
                view.kv_events_url,
                view.engine_secret,
            ):
                task.cancel()
                del self._streams[worker_id]
                self.index.drop(worker_id)
        for worker_id, view in wanted.items():
            if worker_id not in self._streams:
                task = asyncio.create_task(self._follow(view), name=f"kv-events {worker_id}")
                self._streams[worker_id] = (view, task)
            model = view.model_names[0]
            if model not in self._tokenizers and model not in self._fetching:
                self._fetching[model] = asyncio.create_task(self._fetch_tokenizer(model, view))

    async def close(self) -> None:
        tasks = [task for _, task in self._streams.values()] + list(self._fetching.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._streams.clear()
        self._fetching.clear()

    # -- one worker's stream ------------------------------------------------------------

    async def _follow(self, worker: WorkerView) -> None:
        """Read the worker's stream forever, reconnecting (and resyncing) when it breaks."""
        assert self.session is not None
        url = f"{worker.kv_events_url}/kv/events"
        backoff_s = constants.KV_RECONNECT_S
        while True:
            dead_after_s = constants.KV_STREAM_DEAD_S
            try:
                async with asyncio.timeout(dead_after_s):
                    response = await self.session.get(url, headers=_auth(worker))
                try:
                    if response.status != 200:
                        raise ConnectionError(f"HTTP {response.status}")
                    async for line in _lines(response, dead_after_s):
                        self._apply(worker.worker_id, line)
                        backoff_s = constants.KV_RECONNECT_S  # it works: start over if it breaks
                finally:
                    response.close()  # never back to the pool: the agent may still be writing
                raise ConnectionError("the stream ended")
            except (aiohttp.ClientError, ConnectionError, TimeoutError, ValueError) as exc:
                self.reconnects += 1
                logger.warning(
                    "KV events of %s: %s; reconnecting in %.1fs",
                    worker.worker_id,
                    exc or type(exc).__name__,
                    backoff_s,
                )
            await asyncio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, constants.KV_RECONNECT_MAX_S)

    def _apply(self, worker_id: str, line: bytes) -> None:
        try:
            message = KvMessage.model_validate(orjson.loads(line))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            self.bad_lines += 1
            raise ValueError(f"unreadable event ({exc.__class__.__name__})") from None
        index = self.index
        if message.type is KvMessageType.SNAPSHOT:
            index.replace(worker_id, message.keys, message.block_size)
        elif message.type is KvMessageType.STORED:
            if message.block_size is not None:
                index.block_size[worker_id] = message.block_size
            index.store(worker_id, message.keys)
        elif message.type is KvMessageType.REMOVED:
            index.remove(worker_id, message.keys)
        elif message.type is KvMessageType.CLEARED:
            index.replace(worker_id, (), index.block_size.get(worker_id))

    async def _fetch_tokenizer(self, model: str, worker: WorkerView) -> None:
        """Load the model's tokenizer from the worker; on failure, the next table tries again."""
        assert self.session is not None
        try:
            async with (
                asyncio.timeout(constants.KV_TOKENIZER_FETCH_TIMEOUT_S),
                self.session.get(
                    f"{worker.kv_events_url}/kv/tokenizer", headers=_auth(worker)
                ) as response,
            ):
                response.raise_for_status()
                files = orjson.loads(await response.read())["files"]
            if "tokenizer.json" in files:
                self._tokenizers[model] = await asyncio.to_thread(PromptTokenizer, files)
                logger.info("tokenizer of %s loaded for cache-aware routing", model)
            else:  # not asked again: the files will not change
                self._tokenizers[model] = None
                logger.warning(
                    "model %s has no tokenizer.json: kv_events routes it by load only", model
                )
        except Exception as exc:  # a broken file as much as a network error
            logger.warning(
                "cannot load the tokenizer of %s from %s: %s", model, worker.worker_id, exc
            )
            await asyncio.sleep(constants.KV_RECONNECT_MAX_S)
        finally:
            self._fetching.pop(model, None)

    # -- metrics ----------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        blocks = GaugeMetricFamily(
            "fleetserve_gateway_kv_blocks",
            "KV-cache blocks each worker's engine holds, as this gateway knows from its events.",
            labels=["worker"],
        )
        for worker_id in sorted(self.index.workers()):
            blocks.add_metric([worker_id], self.index.blocks(worker_id))
        yield blocks
        yield GaugeMetricFamily(
            "fleetserve_gateway_kv_stream_reconnects",
            "KV event streams this gateway opened again after they broke, stalled or sent "
            "garbage (each time it resynchronized from a snapshot).",
            value=self.reconnects,
        )


def _auth(worker: WorkerView) -> dict[str, str]:
    return {"Authorization": f"Bearer {worker.engine_secret}"} if worker.engine_secret else {}


async def _lines(response: aiohttp.ClientResponse, dead_after_s: float) -> AsyncIterator[bytes]:
    """The body's lines; TimeoutError after ``dead_after_s`` without a byte."""
    buffer = bytearray()
    while True:
        async with asyncio.timeout(dead_after_s):
            chunk = await response.content.readany()
        if not chunk:
            return
        searched = len(buffer)
        buffer += chunk
        end = buffer.rfind(b"\n", searched)
        if end < 0:
            if len(buffer) > constants.KV_STREAM_MAX_LINE_BYTES:
                raise ValueError("an event line longer than any snapshot")
            continue
        lines = bytes(buffer[:end]).split(b"\n")
        del buffer[: end + 1]
        for line in lines:
            if line:
                yield line
