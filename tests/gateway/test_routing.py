"""Routing policies are pure: plain objects in, a worker out."""

from __future__ import annotations

import random
from collections import Counter

from fleetserve.protocol import WorkerLoad, WorkerView
from gateway.routing import (
    LeastLoadPolicy,
    PowerOfTwoPolicy,
    PrefixAffinityPolicy,
    RoundRobinPolicy,
    RoutingContext,
    RoutingPolicy,
    SessionPolicy,
)


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
    assert set(RoutingPolicy.registry) == {
        "least_load",
        "round_robin",
        "power_of_two",
        "prefix_affinity",
        "session",
    }
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


def test_power_of_two_takes_the_less_loaded_of_two() -> None:
    policy = PowerOfTwoPolicy(random.Random(2))
    a, b = _view("a"), _view("b")
    ctx = RoutingContext(in_flight={"a": 5})
    assert all(policy.pick([a, b], ctx) is b for _ in range(20))  # with two, both are drawn
    assert policy.pick([a], ctx) is a


def _chat(system: str, user: str = "hi") -> dict[str, object]:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def test_prefix_affinity_keeps_a_prefix_on_one_worker_and_spreads_prefixes() -> None:
    policy = PrefixAffinityPolicy()
    workers = [_view(name) for name in "abcd"]
    homes = {}
    for i in range(40):
        system = f"You are assistant number {i}. " * 20
        picks = {
            policy.pick(workers, RoutingContext(payload=_chat(system, f"q{j}"))).worker_id
            for j in range(5)
        }
        assert len(picks) == 1  # same prefix, different questions: one worker
        homes[i] = picks.pop()
    assert len(set(homes.values())) == 4  # 40 prefixes use every worker
    completion = RoutingContext(payload={"prompt": "You are assistant number 1. " * 20})
    assert completion.prefix.startswith("You are assistant number 1.")


def test_a_hot_prefix_spills_once_its_worker_is_loaded() -> None:
    policy = PrefixAffinityPolicy()
    workers = [_view(name) for name in "abcd"]
    payload = _chat("the same long system prompt " * 20)
    home = policy.pick(workers, RoutingContext(payload=payload)).worker_id
    in_flight = {home: 4}  # bound: max(ceil(1.25 * 5 / 4), 4) = 4, and this would be the 5th
    spilled = policy.pick(workers, RoutingContext(in_flight=in_flight, payload=payload))
    assert spilled.worker_id != home
    assert (
        policy.pick(workers, RoutingContext(in_flight={home: 3}, payload=payload)).worker_id == home
    )


def test_session_affinity_by_session_and_least_load_without() -> None:
    policy = SessionPolicy()
    workers = [_view(name) for name in "abc"]
    for user in ("alice", "bob", "carol"):
        first = policy.pick(workers, RoutingContext(session=user))
        loaded = {first.worker_id: 10}
        assert policy.pick(workers, RoutingContext(in_flight=loaded, session=user)) is first
    ctx = RoutingContext(in_flight={"a": 1, "b": 1})
    assert policy.pick(workers, ctx).worker_id == "c"
