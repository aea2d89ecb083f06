"""On-demand decisions (fleetserve/cli/ondemand.py) from hand-made controller views: no
process, no clock."""

from __future__ import annotations

from controller.protocol import ModelState
from fleetserve.cli.ondemand import Action, Decision, OnDemand
from fleetserve.protocol import WorkerLoad, WorkerState, WorkerView


def _state(demand_age_s: float | None = None, name: str = "m") -> ModelState:
    return ModelState(
        name=name, declared=True, replicas=0, ready=0, state="x", demand_age_s=demand_age_s
    )


def _worker(
    tokens: int = 0, running: int = 0, state: WorkerState = WorkerState.READY, name: str = "m"
) -> WorkerView:
    return WorkerView(
        worker_id=f"w-{name}",
        model_names=[name],
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


def test_models_that_do_not_fit_together_take_turns_least_recently_used_first() -> None:
    """Three on-demand models of 2 GPUs (or cores) each, with room for two at a time."""
    on_demand = OnDemand({"a": 300, "b": 300, "c": 300}, {"a": 2, "b": 2, "c": 2}, capacity=4)
    started = on_demand.decide(0, [_state(0, "a"), _state(0, "b")], [])
    assert _actions(started) == [(Action.START, "a"), (Action.START, "b")]  # both fit
    on_demand.decide(20, [], [_worker(name="a"), _worker(name="b")])  # ready
    on_demand.decide(30, [], [_worker(tokens=5, name="a"), _worker(name="b")])  # a used at 30
    on_demand.decide(40, [], [_worker(tokens=5, name="a"), _worker(tokens=9, name="b")])  # b
    # c is asked for: b was used last, a stops for it (idle 10 s, well before its timeout)
    decisions = on_demand.decide(
        41, [_state(0.5, "c")], [_worker(tokens=5, name="a"), _worker(tokens=9, name="b")]
    )
    assert _actions(decisions) == [(Action.STOP, "a"), (Action.START, "c")]
    assert decisions[0].reason == "least recently used; room for c"
    assert not on_demand.running("a") and on_demand.running("b")


def test_a_model_that_does_not_fit_waits_while_the_others_are_busy_or_loading() -> None:
    on_demand = OnDemand({"a": 300, "b": 300, "c": 300}, {"a": 1, "b": 2, "c": 0}, capacity=2)
    assert _actions(on_demand.decide(0, [_state(0, "a")], [])) == [(Action.START, "a")]
    # b does not fit beside a, which is still loading; c takes no GPU and starts anyway
    decisions = on_demand.decide(1, [_state(0, "b"), _state(0, "c")], [])
    assert _actions(decisions) == [(Action.WAIT, "b"), (Action.START, "c")]
    assert decisions[0].reason == "waiting for room: a in use"
    busy = [_worker(running=1, name="a")]
    # a is ready and busy: b still waits (said once)
    assert _actions(on_demand.decide(2, [_state(1, "b")], busy)) == [(Action.READY, "a")]
    assert not on_demand.running("b")
    # a's request ends: a (the least recently used model that frees GPUs) makes room for b
    decisions = on_demand.decide(3, [_state(2, "b")], [_worker(tokens=3, name="a")])
    assert _actions(decisions) == [(Action.STOP, "a"), (Action.START, "b")]
