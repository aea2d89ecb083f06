"""The registry's decisions with a hand-driven clock: no network, no sleeping."""

from __future__ import annotations

import asyncio
import logging

import pytest

from controller.protocol import DeclaredModel
from controller.registry import Registry
from fleetserve.protocol import Registration, WorkerLoad, WorkerState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _worker(worker_id: str = "w1", *names: str) -> Registration:
    return Registration(
        worker_id=worker_id,
        model_names=list(names or ["m"]),
        base_url="http://h:1/v1",
        engine="fake",
        capacity=8,
    )


def test_register_heartbeat_drain_deregister_bump_the_version() -> None:
    clock = Clock()
    registry = Registry(expiry_after_s=6, warmup_s=3, clock=clock)
    registry.register(_worker())
    assert registry.version == 1
    assert registry.heartbeat("w1", WorkerLoad()) is True
    assert registry.version == 1  # same load: nothing for gateways to learn
    assert registry.heartbeat("w1", WorkerLoad(running=3, waiting=1)) is True
    assert registry.version == 2
    assert registry.table().workers[0].load.running == 3
    assert registry.drain("w1") and registry.table().workers[0].state is WorkerState.DRAINING
    assert registry.deregister("w1") and registry.table().workers == []
    assert registry.heartbeat("w1", WorkerLoad()) is False  # unknown: register again
    assert registry.deregister("w1") is False


def test_silent_workers_expire() -> None:
    clock = Clock()
    registry = Registry(expiry_after_s=6, warmup_s=3, clock=clock)
    registry.register(_worker("a"))
    registry.register(_worker("b"))
    clock.now += 5
    registry.heartbeat("b", WorkerLoad())
    clock.now += 2
    assert registry.expire() == ["a"]
    assert [w.worker_id for w in registry.table().workers] == ["b"]
    assert registry.expirations_total == 1


def test_long_poll_waits_for_warmup_then_for_a_change() -> None:
    async def scenario() -> None:
        clock = Clock()
        registry = Registry(
            expiry_after_s=6, warmup_s=0.5, clock=lambda: asyncio.get_running_loop().time()
        )
        # fresh controller: nothing is answered before the warm-up
        assert await registry.wait_for_change("", -1, timeout_s=0.01) is None
        table = await registry.wait_for_change("", -1, timeout_s=1)
        assert table is not None and table.version == 0
        # same epoch and version: waits until something changes
        waiter = asyncio.create_task(
            registry.wait_for_change(table.epoch, table.version, timeout_s=5)
        )
        await asyncio.sleep(0.01)
        assert not waiter.done()
        registry.register(_worker())
        changed = await asyncio.wait_for(waiter, 10)
        assert changed is not None and changed.version == 1
        # another epoch (the controller restarted): answered at once
        other = await registry.wait_for_change("old-epoch", 99, timeout_s=1)
        assert other is not None and other.epoch == registry.epoch
        assert (
            await registry.wait_for_change(registry.epoch, registry.version, timeout_s=0.01) is None
        )
        del clock

    asyncio.run(scenario())


def test_the_routing_policy_is_the_models_and_the_newest_registration_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry(expiry_after_s=6, warmup_s=0, clock=Clock())
    old = _worker("w1").model_copy(update={"routing_policy": "round_robin"})
    new = _worker("w2").model_copy(update={"routing_policy": "session"})
    registry.register(old)
    assert [(m.name, m.routing_policy) for m in registry.table().models] == [("m", "round_robin")]
    with caplog.at_level(logging.WARNING, logger="controller.registry"):
        registry.register(new)  # a rolling change of policy
    assert [(m.name, m.routing_policy) for m in registry.table().models] == [("m", "session")]
    assert "registers routing policy session, other workers registered round_robin" in caplog.text
    assert "routing_policy" not in registry.table().workers[0].model_dump()  # not per worker


def test_a_model_with_fallbacks_stays_in_the_table_after_its_last_worker() -> None:
    """So that gateways keep sending its requests to its fallbacks (its engine died, it is
    being replaced); a model without fallbacks leaves with its last worker."""
    registry = Registry(expiry_after_s=6, warmup_s=3, clock=Clock())
    with_fallbacks = _worker("a1", "a", "a-alias").model_copy(update={"fallbacks": ["b"]})
    registry.register(with_fallbacks)
    registry.register(_worker("b1", "b"))
    assert [(m.name, m.fallbacks, m.aliases) for m in registry.table().models] == [
        ("a", ["b"], ["a-alias"]),
        ("b", [], []),
    ]
    registry.deregister("a1")
    registry.deregister("b1")
    table = registry.table()
    assert table.workers == [] and [m.name for m in table.models] == ["a"]
    # the newest registration says: without fallbacks now, it leaves with its workers
    registry.register(_worker("a2", "a"))
    registry.deregister("a2")
    assert registry.table().models == []


def test_a_declared_model_is_published_before_its_workers_and_after_them() -> None:
    registry = Registry(expiry_after_s=6, warmup_s=3, clock=Clock())
    registry.declare(DeclaredModel(name="m", aliases=["m2"], replicas=2, fallbacks=["other"]))
    (view,) = registry.table().models
    assert (view.name, view.aliases, view.fallbacks) == ("m", ["m2"], ["other"])
    assert (view.declared, view.replicas) == (True, 2)
    assert [(s.state, s.ready, s.replicas) for s in registry.models()] == [("starting", 0, 2)]
    version = registry.version
    registry.declare(DeclaredModel(name="m", aliases=["m2"], replicas=2, fallbacks=["other"]))
    assert registry.version == version  # the same declaration: nothing for gateways to learn

    registry.register(_worker("a", "m"))
    assert [(s.state, s.ready) for s in registry.models()] == [("starting", 1)]
    registry.register(_worker("b", "m"))
    assert [(s.state, s.ready) for s in registry.models()] == [("ready", 2)]
    registry.drain("b")
    assert [(s.state, s.ready) for s in registry.models()] == [("starting", 1)]
    registry.deregister("a")
    registry.deregister("b")
    (view,) = registry.table().models  # workers gone: still there, its requests held
    assert view.declared

    assert registry.undeclare("m") and registry.table().models == []
    assert registry.undeclare("m") is False


def test_an_undeclared_served_model_is_ready_and_not_declared() -> None:
    registry = Registry(expiry_after_s=6, warmup_s=3, clock=Clock())
    registry.register(_worker("a", "m"))
    assert [(s.name, s.declared, s.state) for s in registry.models()] == [("m", False, "ready")]
    registry.declare(DeclaredModel(name="z", replicas=0))  # on demand, none running
    assert [s.state for s in registry.models()] == ["ready", "scaled_to_zero"]
