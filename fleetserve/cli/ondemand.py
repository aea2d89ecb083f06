"""On-demand models under `fleetserve up`: when to start their replicas and when to stop them.

Pure decisions from what the controller says (``GET /models``: the gateways' demand for a
model scaled to zero; the table: its workers' load), with the time given: `up` carries them
out (fleetserve/cli/up.py). A model starts when a gateway holds a request for it after it
last stopped, and stops after ``idle_timeout_s`` without a sign of use: a request in its
engines, a token generated, a request held. One supervisor decides, once per poll, and a
started model counts as running from the decision on: a burst of requests starts it once.

Models that do not fit together take turns (``capacity``: the GPUs, or on vLLM's CPU build
the cores, that on-demand models share; fleetserve/cli/placing.py): a model that would not
fit beside the running ones stops the least recently used idle ones first, as Ollama
evicts; while the running ones are busy it waits (its requests stay held), and nothing is
stopped that would not make room.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from controller.protocol import ModelState
from fleetserve.protocol import WorkerState, WorkerView

logger = logging.getLogger(__name__)


class Action(StrEnum):
    START = "start"
    STOP = "stop"
    #: Not an action: a started model's first replica became ready (for the log).
    READY = "ready"
    #: Not an action: a model is asked for but does not fit until a busy one is idle.
    WAIT = "wait"


@dataclass(frozen=True)
class Decision:
    action: Action
    model: str
    #: Why, for the log: "a request is waiting", "idle for 300s", "after 4.2s".
    reason: str
    #: READY: seconds from the decision to start to the first ready replica.
    cold_start_s: float = 0.0


@dataclass
class _Model:
    idle_timeout_s: float
    running: bool = False
    #: When it was started, while no replica is ready yet (None: not starting).
    starting_since: float | None = None
    #: When it last stopped (demand from before then is spent).
    stopped_at: float = float("-inf")
    last_active: float = 0.0
    #: Tokens its workers had generated at the last look (a change is use).
    tokens: int = -1
    #: What it waits for (a WAIT said once per reason).
    waiting: str = ""


class OnDemand:
    """The on-demand models of one cluster and what to do with them next."""

    def __init__(
        self,
        idle_timeouts_s: dict[str, float],
        units: dict[str, int] | None = None,
        capacity: int | None = None,
    ) -> None:
        """``idle_timeouts_s``: each on-demand model's served name -> its idle timeout.

        ``units``: what each model takes while it runs (GPUs or cores, every replica's),
        out of ``capacity``; None: they all fit together.
        """
        self._models = {name: _Model(timeout) for name, timeout in idle_timeouts_s.items()}
        self._units = units or {}
        self._capacity = capacity

    def __contains__(self, model: str) -> bool:
        return model in self._models

    def running(self, model: str) -> bool:
        return self._models[model].running

    def decide(
        self, now: float, states: Iterable[ModelState], workers: Iterable[WorkerView]
    ) -> list[Decision]:
        """What to do now, given the controller's models and workers."""
        demand = {s.name: now - s.demand_age_s for s in states if s.demand_age_s is not None}
        ready: dict[str, int] = {}
        busy: set[str] = set()
        tokens: dict[str, int] = {}
        for worker in workers:
            name = worker.model_names[0]
            if worker.state is WorkerState.READY:
                ready[name] = ready.get(name, 0) + 1
            if worker.load.running or worker.load.waiting:
                busy.add(name)
            tokens[name] = tokens.get(name, 0) + worker.load.generated_tokens
        decisions = []
        for name, model in self._models.items():
            if not model.running:
                continue
            asked_at = demand.get(name)
            if model.starting_since is not None:
                if ready.get(name):
                    cold_start_s = now - model.starting_since
                    model.starting_since = None
                    decisions.append(
                        Decision(Action.READY, name, f"after {cold_start_s:.1f}s", cold_start_s)
                    )
                model.last_active = now  # (a model still loading is not idle)
                continue
            used = tokens.get(name, 0)
            if name in busy or used != model.tokens or (asked_at or 0) > model.last_active:
                model.last_active = now
            model.tokens = used
            idle_s = now - model.last_active
            if idle_s >= model.idle_timeout_s:
                decisions.append(self._stop(name, now, f"idle for {idle_s:.0f}s"))
        asked = [n for n, m in self._models.items() if not m.running and n in demand]
        for name in sorted(asked, key=lambda n: demand[n]):  # the longest waiting first
            model = self._models[name]
            if demand[name] <= model.stopped_at:
                continue  # asked before it stopped: spent
            evict = self._make_room(name, busy)
            if evict is None:
                waiting = [n for n, m in self._models.items() if m.running and self._units.get(n)]
                reason = f"waiting for room: {', '.join(waiting)} in use"
                if reason != model.waiting:
                    model.waiting = reason
                    decisions.append(Decision(Action.WAIT, name, reason))
                continue
            for other in evict:
                decisions.append(self._stop(other, now, f"least recently used; room for {name}"))
            model.running, model.waiting = True, ""
            model.starting_since = model.last_active = now
            decisions.append(Decision(Action.START, name, "a request is waiting"))
        return decisions

    def _stop(self, name: str, now: float, reason: str) -> Decision:
        model = self._models[name]
        model.running = False
        model.stopped_at = now
        model.tokens = -1
        return Decision(Action.STOP, name, reason)

    def _make_room(self, name: str, busy: set[str]) -> list[str] | None:
        """The idle models to stop, least recently used first, so that ``name`` fits ([]:
        it fits already); None if it cannot fit until a busy or loading one is idle."""
        if self._capacity is None:
            return []
        running = [n for n, m in self._models.items() if m.running]
        free = self._capacity - sum(self._units.get(n, 0) for n in running)
        idle = [
            n
            for n in running
            if self._units.get(n) and n not in busy and self._models[n].starting_since is None
        ]
        evict: list[str] = []
        for other in sorted(idle, key=lambda n: self._models[n].last_active):
            if free >= self._units.get(name, 0):
                break
            evict.append(other)
            free += self._units[other]
        return evict if free >= self._units.get(name, 0) else None
