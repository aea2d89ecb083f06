"""Routing policies, registered by name: which worker of a model gets a request.

Every policy has one signature, ``pick(candidates, ctx) -> worker``, with
``candidates`` never empty; policies are pure and unit-tested without a network.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from fleetserve.protocol import WorkerView


@dataclass
class RoutingContext:
    """What a policy may look at besides the candidates."""

    in_flight: dict[str, int] = field(
        default_factory=dict
    )  # worker_id -> requests from this gateway


class RoutingPolicy:
    registry: ClassVar[dict[str, type[RoutingPolicy]]] = {}
    default_name: ClassVar[str] = ""
    name: ClassVar[str]

    def __init_subclass__(cls, name: str, default: bool = False, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name
        RoutingPolicy.registry[name] = cls
        if default:
            RoutingPolicy.default_name = name

    def pick(self, candidates: Sequence[WorkerView], ctx: RoutingContext) -> WorkerView:
        raise NotImplementedError


class LeastLoadPolicy(RoutingPolicy, name="least_load", default=True):
    """The worker with the fewest requests in flight from this gateway plus queued in its engine.

    Ties are broken at random so that idle workers share the load evenly.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[WorkerView], ctx: RoutingContext) -> WorkerView:
        def load(worker: WorkerView) -> float:
            return (ctx.in_flight.get(worker.worker_id, 0) + worker.load.waiting) / worker.capacity

        lowest = min(load(worker) for worker in candidates)
        return self._rng.choice([worker for worker in candidates if load(worker) == lowest])


class RoundRobinPolicy(RoutingPolicy, name="round_robin"):
    """Each worker in turn, whatever its load."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[WorkerView], ctx: RoutingContext) -> WorkerView:
        ordered = sorted(candidates, key=lambda worker: worker.worker_id)
        return ordered[next(self._counter) % len(ordered)]
