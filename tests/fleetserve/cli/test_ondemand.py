"""On-demand decisions (fleetserve/cli/ondemand.py) from hand-made controller views: no
process, no clock."""

from __future__ import annotations

import pytest
from rich.console import Console

from fleetserve.cli.cluster import parse_cluster
from fleetserve.cli.ondemand import Action, Decision, OnDemand
from fleetserve.errors import ConfigError
from fleetserve.protocol import ModelState, WorkerLoad, WorkerState, WorkerView
from fleetserve.ray.deploy import deploy


def _state(demand_age_s: float | None = None) -> ModelState:
    return ModelState(
        name="m", declared=True, replicas=0, ready=0, state="x", demand_age_s=demand_age_s
    )


def _worker(
    tokens: int = 0, running: int = 0, state: WorkerState = WorkerState.READY
) -> WorkerView:
    return WorkerView(
        worker_id="w",
        model_names=["m"],
        base_url="http://h:1/v1",
        engine="fake",
        capacity=8,
        state=WorkerState.READY,
        load=WorkerLoad(generated_tokens=tokens, running=running),
        last_heartbeat_age_s=0,
    )


def _actions(decisions: list[Decision]) -> list[tuple[Action, str]]:
    return [(d.action, d.model) for d in decisions]


def test_a_held_request_starts_the_model_once_and_idleness_stops_it() -> None:
    on_demand = OnDemand({"m": 10})
    assert on_demand.decide(0, [_state()], []) == []  # nobody asked
    assert _actions(on_demand.decide(1, [_state(0.5)], [])) == [(Action.START, "m")]
    assert on_demand.decide(1.5, [_state(1.0)], []) == []  # the same burst: started already
    assert on_demand.decide(30, [_state(29)], []) == []  # loading is not idleness
    (ready,) = on_demand.decide(31, [_state(30)], [_worker()])
    assert (ready.action, ready.cold_start_s) == (Action.READY, 30)
    assert on_demand.decide(35, [_state(34)], [_worker(tokens=5)]) == []  # used at 35
    assert on_demand.decide(44, [_state()], [_worker(tokens=5, running=1)]) == []  # busy at 44
    assert on_demand.decide(53, [_state()], [_worker(tokens=5)]) == []  # 9 s idle
    assert _actions(on_demand.decide(54, [_state()], [_worker(tokens=5)])) == [(Action.STOP, "m")]
    # demand from before the stop is spent; a new one starts it again
    assert on_demand.decide(55, [_state(20)], []) == []
    assert _actions(on_demand.decide(56, [_state(0.1)], [])) == [(Action.START, "m")]


def test_ray_refuses_on_demand_models_before_anything_starts() -> None:
    cluster = parse_cluster({"models": [{"name": "m", "engine": "fake", "load": "on_demand"}]})
    with pytest.raises(ConfigError, match="load on_demand runs under `fleetserve up` only"):
        deploy(cluster, "http://127.0.0.1:1", None, Console())
