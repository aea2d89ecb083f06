"""One closed-loop load generator: N clients, each sending its next request when the last ended.

What a request is (a raw HTTP POST, an `openai` client call, a chat turn) is the
caller's: a ``send(client_index)`` coroutine returning the :class:`Outcome`.
`fleetserve bench`, the benchmarks in bench/ and the tests' background load all
drive their clients with :func:`closed_loop`; :func:`post_sender` is the lean
sender of the benchmarks (one pooled aiohttp session, bytes in, bytes out).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp


@dataclass(slots=True)
class Outcome:
    """One request, as the client saw it."""

    started: float = field(default_factory=time.perf_counter)
    ended: float = 0.0
    #: When the first byte (streams: the first chunk) of the answer arrived.
    first_byte: float | None = None
    error: str | None = None
    #: Stream chunks received (before the end, or before the failure).
    chunks: int = 0
    #: The worker that answered (the gateway's x-fleetserve-worker header), when known.
    worker: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


Send = Callable[[int], Awaitable[Outcome]]


async def closed_loop(
    send: Send,
    concurrency: int,
    until: Callable[[], bool],
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run ``concurrency`` clients until ``until()`` says stop; every request's outcome.

    A client checks ``until`` before each request, so the requests in flight when it
    turns true still finish (and are reported).
    """
    outcomes: list[Outcome] = []

    async def client(index: int) -> None:
        while not until():
            outcome = await send(index)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return outcomes


def for_duration(duration_s: float) -> Callable[[], bool]:
    """An ``until`` for :func:`closed_loop`: true once ``duration_s`` passed from now."""
    stop_at = time.perf_counter() + duration_s
    return lambda: time.perf_counter() >= stop_at


def post_sender(
    session: aiohttp.ClientSession, url: str, body: bytes | Callable[[int], bytes], stream: bool
) -> Send:
    """POST ``body`` (or ``body(client_index)``) as JSON to ``url``, reading the whole answer."""
    headers = {"content-type": "application/json"}

    async def send(index: int) -> Outcome:
        outcome = Outcome()
        data = body(index) if callable(body) else body
        try:
            async with session.post(url, data=data, headers=headers) as response:
                outcome.worker = response.headers.get("x-fleetserve-worker")
                if stream:
                    async for _ in response.content.iter_any():
                        outcome.chunks += 1
                        if outcome.first_byte is None:
                            outcome.first_byte = time.perf_counter()
                else:
                    await response.read()
                    outcome.first_byte = time.perf_counter()
                if response.status != 200:
                    outcome.error = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.ended = time.perf_counter()
        return outcome

    return send
