"""Autoscaling decisions over described loads (no Ray needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fleetserve.ray.autoscaling import ONGOING_REQUESTS, ServePolicy, desired_replicas


@pytest.mark.parametrize(
    ("ongoing", "current", "expected"),
    [
        ([40.0, 40.0], 2, 5),  # 80 in flight, 16 per replica: 5 replicas
        ([16.0, 16.0], 2, 2),  # on target: stay
        ([3.0, 0.0, 1.0], 3, 1),  # mostly idle: one is enough
        ([0.0], 1, 1),  # never below one (min_replicas bounds it further)
        ([17.0], 1, 2),  # just over: one more
        ([], 3, 3),  # nobody reported yet (loading): keep
    ],
)
def test_replicas_follow_the_ongoing_requests(
    ongoing: list[float], current: int, expected: int
) -> None:
    assert desired_replicas(ongoing, 16.0, current) == expected


@pytest.mark.parametrize(
    ("ongoing", "current", "held", "expected"),
    [
        ([], 0, False, 0),  # scaled to zero, nobody asks: stays at zero
        ([], 0, True, 1),  # a gateway holds a request: one replica
        ([], 1, True, 1),  # it loads (no report yet): still one, not two
        ([0.0], 1, False, 0),  # idle, nothing held: back to zero (after Serve's delay)
        ([0.0], 1, True, 1),  # answered, but another request is held already
        ([40.0], 1, True, 3),  # the load decides above one
    ],
)
def test_a_model_with_min_replicas_0_follows_the_held_requests(
    ongoing: list[float], current: int, held: bool, expected: int
) -> None:
    assert desired_replicas(ongoing, 16.0, current, held, min_replicas=0) == expected


def test_the_serve_policy_reads_the_replicas_reports() -> None:
    ctx = SimpleNamespace(
        aggregated_metrics={ONGOING_REQUESTS: {"replica-a": 9.0, "replica-b": 7.5}},
        config=SimpleNamespace(target_ongoing_requests=4.0),
        current_num_replicas=2,
    )
    policy = ServePolicy("m", "http://127.0.0.1:1")  # min_replicas 1: never asks for demand
    assert policy(ctx) == (5, {})
    ctx.aggregated_metrics = None  # custom metrics not collected yet
    assert policy(ctx) == (2, {})
