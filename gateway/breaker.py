"""Retries that do not make things worse: a circuit per worker, a retry budget, backoff.

- **Circuit breaker**, per worker: closed (picked as usual); open after
  ``failures`` consecutive failures, at once when the worker refuses connections
  (nothing listens there), and then not picked at all; after ``open_s``, half-open:
  one request probes it; a success closes the circuit, a failure opens it again
  for twice as long (up to ``constants.CIRCUIT_OPEN_MAX_S``). A worker that fails
  one poisonous request now and then (an HTTP 500 for that request only) is never
  taken out: the successes in between reset its count.
- **Retry budget**, per gateway process: retries (another worker after a failure
  before the first byte, a stream resumed, a request re-run) may be at most
  ``ratio`` of the requests of the last ``constants.RETRY_BUDGET_WINDOW_S`` (or of
  the requests in flight, if more), plus ``min_per_s`` per second of that window
  so that a quiet gateway can still retry. When every worker fails, the cluster
  gets at most ``1 + ratio`` times its load, not ``constants.MAX_ATTEMPTS`` times.
- **Backoff**: the n-th retry of one request first waits a random time in
  ``[0, min(constants.RETRY_BACKOFF_MAX_S, constants.RETRY_BACKOFF_BASE_S * 2**(n-1))]``
  ("full jitter"), so that retries of many requests do not arrive together.

Pure logic with an injected clock (tests/gateway/test_breaker.py); gateway/proxy.py acts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from fleetserve import constants


class Circuit(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


@dataclass(slots=True)
class _Worker:
    """A worker that failed lately (closed workers with no failure have no entry)."""

    failures: int = 0
    #: While open: until when; 0.0 while closed.
    open_until: float = 0.0
    #: How long it stays open the next time it opens.
    open_s: float = 0.0
    #: A half-open worker's probe request is under way.
    probing: bool = False


class CircuitBreakers:
    """Every worker's circuit, as this gateway process sees it."""

    def __init__(
        self, failures: int, open_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failures
        self._open_s = open_s
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        #: worker id -> times its circuit opened (a counter for the metrics).
        self.opened: dict[str, int] = {}

    def available(self, worker_id: str, now: float) -> bool:
        """May a request go to this worker now? (The hot path: one dict lookup when healthy.)"""
        worker = self._workers.get(worker_id)
        if worker is None or not worker.open_until:
            return True
        return now >= worker.open_until and not worker.probing

    def picked(self, worker_id: str) -> None:
        """A request goes to the worker: if its circuit is half-open, that request is the probe."""
        worker = self._workers.get(worker_id)
        if worker is not None and worker.open_until:
            worker.probing = True

    def succeeded(self, worker_id: str) -> None:
        if worker_id in self._workers:
            del self._workers[worker_id]  # closed, failures forgotten

    def failed(self, worker_id: str, refused: bool = False) -> None:
        """A failure: ``refused`` when nothing accepted the connection (opens at once)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            if len(self._workers) > constants.CIRCUITS_KEPT:  # workers come and go
                self._forget_closed()
            worker = self._workers[worker_id] = _Worker(open_s=self._open_s)
        worker.failures += 1
        now = self._clock()
        if worker.open_until:  # the probe failed (or a request that started before opening)
            if worker.probing or now >= worker.open_until:
                worker.open_s = min(2 * worker.open_s, constants.CIRCUIT_OPEN_MAX_S)
                self._open(worker_id, worker, now)
        elif refused or worker.failures >= self._threshold:
            self._open(worker_id, worker, now)

    def done(self, worker_id: str) -> None:
        """The request to the worker ended without a verdict (the client left): no probe now."""
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.probing = False

    def state(self, worker_id: str, now: float) -> Circuit:
        worker = self._workers.get(worker_id)
        if worker is None or not worker.open_until:
            return Circuit.CLOSED
        return Circuit.OPEN if now < worker.open_until else Circuit.HALF_OPEN

    def states(self) -> dict[str, tuple[Circuit, int]]:
        """Workers that failed lately: (circuit, consecutive failures)."""
        now = self._clock()
        return {wid: (self.state(wid, now), w.failures) for wid, w in self._workers.items()}

    def _open(self, worker_id: str, worker: _Worker, now: float) -> None:
        worker.open_until = now + worker.open_s
        worker.probing = False
        self.opened[worker_id] = self.opened.get(worker_id, 0) + 1

    def _forget_closed(self) -> None:
        now = self._clock()
        horizon = now - constants.CIRCUIT_OPEN_MAX_S
        self._workers = {
            wid: w for wid, w in self._workers.items() if w.open_until and w.open_until > horizon
        }


class RetryBudget:
    """Retries allowed per window of requests (see the module's docstring)."""

    def __init__(
        self, ratio: float, min_per_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ratio = ratio
        self._floor = min_per_s * constants.RETRY_BUDGET_WINDOW_S
        self._clock = clock
        slots = int(constants.RETRY_BUDGET_WINDOW_S)
        #: Per second of the window (a ring): requests started, retries made.
        self._requests = [0] * slots
        self._retries = [0] * slots
        self._second = 0  # (the clock may be an event loop's, which is not running yet)
        self.refused = 0

    def _slot(self, now: float) -> int:
        second = int(now)
        if second != self._second:  # clear the seconds that passed since the last call
            for s in range(max(self._second + 1, second - len(self._requests) + 1), second + 1):
                self._requests[s % len(self._requests)] = 0
                self._retries[s % len(self._retries)] = 0
            self._second = second
        return second % len(self._requests)

    def request(self, now: float) -> None:
        """A request arrived (the hot path: an index and an increment)."""
        self._requests[self._slot(now)] += 1

    def allow(self, in_flight: int) -> bool:
        """May one more retry go out now? Counts it if so."""
        slot = self._slot(self._clock())
        base = max(sum(self._requests), in_flight)
        if sum(self._retries) >= self._ratio * base + self._floor:
            self.refused += 1
            return False
        self._retries[slot] += 1
        return True


def backoff_s(retry: int, rng: random.Random | None = None) -> float:
    """How long the ``retry``-th retry (1, 2, ...) of a request waits first (full jitter)."""
    cap = min(constants.RETRY_BACKOFF_MAX_S, constants.RETRY_BACKOFF_BASE_S * 2 ** (retry - 1))
    return (rng or random).uniform(0.0, cap)
