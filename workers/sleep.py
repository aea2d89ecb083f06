"""Sleep mode: an idle engine frees its GPU memory and keeps its process, woken on demand.

vLLM's sleep mode (``--enable-sleep-mode``; ``POST /sleep?level=1`` offloads the weights
to CPU memory and drops the KV cache, ``POST /wake_up`` brings them back in seconds, where
a restart reloads the model). The agent decides, from the load it reads on every
heartbeat: after ``sleep_after_s`` with no request in the engine and no token generated,
the worker leaves the routing table first (state SLEEPING: gateways route to it no more,
and hold the model's requests while none of its workers is ready), and the engine sleeps
once nothing runs in it. A gateway holding a request for the model tells the controller
(``POST /models/NAME/demand``), whose reply to the sleeping worker's next heartbeat says
wake; the engine wakes, then the worker is READY again and the held request is answered.

The routes are the agent's only: it reaches the engine's Unix socket itself, and the relay
in front refuses them to everyone else (workers/relay.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

import httpx

from fleetserve.protocol import WorkerLoad

logger = logging.getLogger(__name__)

#: A wake copies the weights back to the GPUs (seconds for 8B, tens for 70B); a sleep waits
#: for what still runs.
WAKE_TIMEOUT_S = 120.0


class Step(StrEnum):
    """What the agent does next (Sleeper.step)."""

    LEAVE = "leave"  # idle long enough: out of the routing table (state SLEEPING)
    SLEEP = "sleep"  # out of the table and nothing runs: the engine sleeps
    WAKE = "wake"  # asked for while asleep: the engine wakes, then the worker is READY


class Sleeper:
    """When a worker's engine sleeps and wakes: decisions from its load, with the clock given."""

    def __init__(self, sleep_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.sleep_after_s = sleep_after_s
        self._clock = clock
        self.leaving = False  # out of the routing table (registered SLEEPING)
        self.asleep = False  # the engine sleeps
        self._last_active = clock()
        self._tokens = -1
        #: For the agent's metrics: times the engine went to sleep and woke, seconds waking.
        self.sleeps = self.wakes = 0
        self.wake_seconds = 0.0

    def step(self, load: WorkerLoad, wake: bool) -> Step | None:
        """What to do after a heartbeat that read ``load`` (``wake``: the controller's word)."""
        now = self._clock()
        busy = load.running or load.waiting
        if busy or load.generated_tokens != self._tokens:
            self._last_active = now
        self._tokens = load.generated_tokens
        if self.leaving:
            if wake:
                return Step.WAKE
            return None if self.asleep or busy else Step.SLEEP
        return Step.LEAVE if now - self._last_active >= self.sleep_after_s else None

    def done(self, step: Step) -> None:
        """``step`` was carried out (WAKE: the worker is back in the table; see woke())."""
        if step is Step.LEAVE:
            self.leaving = True
        elif step is Step.SLEEP:
            self.asleep = True
            self.sleeps += 1
        else:
            self.leaving = self.asleep = False
            self._last_active = self._clock()

    def woke(self, seconds: float) -> None:
        """The engine woke in ``seconds`` (the worker is not back in the table yet)."""
        self.asleep = False
        self.wakes += 1
        self.wake_seconds += seconds


async def sleep(engine: httpx.AsyncClient) -> float | None:
    """Put the engine to sleep (level 1: weights offloaded to CPU memory, KV cache dropped;
    ``mode=wait``: what still runs finishes first): the seconds it took, None if refused."""
    return await _call(engine, "/sleep?level=1&mode=wait")


async def wake_up(engine: httpx.AsyncClient) -> float | None:
    return await _call(engine, "/wake_up")


async def _call(engine: httpx.AsyncClient, path: str) -> float | None:
    started = time.monotonic()
    try:
        response = await engine.post(path, timeout=WAKE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        logger.error("engine %s failed: %s", path, exc)
        return None
    if response.status_code != 200:
        logger.error("engine %s answered %d: %s", path, response.status_code, response.text)
        return None
    seconds = time.monotonic() - started
    logger.info("engine %s in %.2fs", path.split("?")[0], seconds)
    return seconds
