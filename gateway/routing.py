"""Routing policies, registered by name: which worker of a model gets a request.

Every policy has one signature, ``pick(candidates, ctx) -> worker``, with
``candidates`` never empty; policies are pure and unit-tested without a network.
A candidate is anything with a worker's id, capacity and load: the gateway's
routing-table targets, or the controller's worker views in the tests.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fleetserve.protocol import WorkerLoad
from fleetserve.registry import Registered

PREFIX_CHARS = 256  # about a system prompt's worth of leading text decides prefix affinity


class Candidate(Protocol):
    @property
    def worker_id(self) -> str: ...
    @property
    def capacity(self) -> int: ...
    @property
    def load(self) -> WorkerLoad: ...


C = TypeVar("C", bound=Candidate)


@dataclass
class RoutingContext:
    """What a policy may look at besides the candidates, for one request."""

    #: worker_id -> requests in flight from this gateway (shared by all requests)
    in_flight: dict[str, int] = field(default_factory=dict)
    #: the request body, parsed
    payload: dict[str, Any] = field(default_factory=dict)
    #: who is talking: the x-session-id header or the request's `user` field
    session: str | None = None

    @functools.cached_property
    def prefix(self) -> str:
        """The prompt's first PREFIX_CHARS characters (messages in order), computed on demand."""
        prompt = self.payload.get("prompt")
        if prompt is not None:
            text = prompt if isinstance(prompt, str) else str(prompt[:1])
            return text[:PREFIX_CHARS]
        parts: list[str] = []
        size = 0
        for message in self.payload.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if isinstance(content, str):
                parts.append(content)
                size += len(content)
            if size >= PREFIX_CHARS:
                break
        return "\x1e".join(parts)[:PREFIX_CHARS]


def load(worker: Candidate, ctx: RoutingContext) -> float:
    """Requests in flight from this gateway plus queued in the engine, per unit of capacity."""
    return (ctx.in_flight.get(worker.worker_id, 0) + worker.load.waiting) / worker.capacity


def rendezvous_order(key: str, candidates: Sequence[C]) -> list[C]:
    """Candidates by highest-random-weight hashing of ``key``: stable as workers come and go."""

    def weight(worker: C) -> bytes:
        return hashlib.blake2b(f"{key}|{worker.worker_id}".encode(), digest_size=8).digest()

    return sorted(candidates, key=weight, reverse=True)


class RoutingPolicy(Registered):
    """Base class; policies register with ``class X(RoutingPolicy, name="x")``."""

    kind = "routing policy"

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        raise NotImplementedError


class LeastLoadPolicy(RoutingPolicy, name="least_load", default=True):
    """The worker with the fewest requests in flight from this gateway plus queued in its engine.

    Ties are broken at random so that idle workers share the load evenly.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        lowest = min(load(worker, ctx) for worker in candidates)
        return self._rng.choice([w for w in candidates if load(w, ctx) == lowest])


class RoundRobinPolicy(RoutingPolicy, name="round_robin"):
    """Each worker in turn, whatever its load."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        ordered = sorted(candidates, key=lambda worker: worker.worker_id)
        return ordered[next(self._counter) % len(ordered)]


class PowerOfTwoPolicy(RoutingPolicy, name="power_of_two"):
    """The less loaded of two workers drawn at random: near least-load, without a full scan."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if load(a, ctx) <= load(b, ctx) else b


class PrefixAffinityPolicy(RoutingPolicy, name="prefix_affinity"):
    """Requests sharing a prompt prefix go to the same worker, so its prefix cache hits.

    Consistent hashing with bounded loads: the prefix ranks the workers, and the
    request goes to the first one whose in-flight requests stay within
    ``(1 + slack)`` times the average, but never below ``min_bound`` (an engine
    batches several requests at no cost, and a prefix should stay home while
    the cluster is quiet): one hot prefix spills to the next worker in its
    ranking instead of swamping its favourite.
    """

    slack = 0.25
    min_bound = 4

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        total = sum(ctx.in_flight.get(w.worker_id, 0) for w in candidates) + 1
        bound = max(math.ceil((1 + self.slack) * total / len(candidates)), self.min_bound)
        ranked = rendezvous_order(ctx.prefix, candidates)
        for worker in ranked:
            if ctx.in_flight.get(worker.worker_id, 0) + 1 <= bound:
                return worker
        return ranked[0]


class SessionPolicy(RoutingPolicy, name="session"):
    """The same session (x-session-id header or `user` field) always meets the same worker.

    Requests without a session are routed by least load.
    """

    def __init__(self) -> None:
        self._fallback = LeastLoadPolicy()

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        if ctx.session is None:
            return self._fallback.pick(candidates, ctx)
        return rendezvous_order(ctx.session, candidates)[0]
