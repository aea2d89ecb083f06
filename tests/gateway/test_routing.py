"""Routing policies are pure: plain objects in, a worker out."""

from __future__ import annotations

import random
from collections import Counter

from fleetserve.protocol import WorkerLoad, WorkerView
from gateway.routing import LeastLoadPolicy, RoundRobinPolicy, RoutingContext, RoutingPolicy


def _view(worker_id: str, waiting: int = 0, capacity: int = 8) -> WorkerView:
    return WorkerView(
        worker_id=worker_id,
        model_names=["m"],
        base_url="http://h/v1",
        engine="fake",
        capacity=capacity,
        load=WorkerLoad(waiting=waiting),
        last_heartbeat_age_s=0,
    )


def test_policies_register_by_name_with_one_default() -> None:
    assert {"least_load", "round_robin"} <= set(RoutingPolicy.registry)
    assert RoutingPolicy.default_name == "least_load"


def test_least_load_counts_in_flight_and_reported_waiting() -> None:
    policy = LeastLoadPolicy(random.Random(0))
    a, b = _view("a"), _view("b", waiting=2)
    assert policy.pick([a, b], RoutingContext(in_flight={"a": 1})) is a
    assert policy.pick([a, b], RoutingContext(in_flight={"a": 3})) is b
    # relative to capacity: 4 of 16 is less loaded than 3 of 8
    big = _view("big", capacity=16)
    assert policy.pick([_view("a"), big], RoutingContext(in_flight={"a": 3, "big": 4})) is big


def test_least_load_breaks_ties_at_random() -> None:
    policy = LeastLoadPolicy(random.Random(1))
    workers = [_view("a"), _view("b"), _view("c")]
    picks = Counter(policy.pick(workers, RoutingContext()).worker_id for _ in range(300))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 60


def test_round_robin_takes_turns() -> None:
    policy = RoundRobinPolicy()
    workers = [_view("b"), _view("a")]
    assert [policy.pick(workers, RoutingContext()).worker_id for _ in range(4)] == [
        "a",
        "b",
        "a",
        "b",
    ]
