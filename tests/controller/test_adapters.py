"""LoRA adapters in the controller: one placement per adapter whatever asks, the replicas'
orders in the heartbeat's reply, the vLLM-CPU rule, refusals. Plain objects, a hand clock."""

from __future__ import annotations

import pytest

from controller.adapters import place
from controller.protocol import DeclaredModel
from controller.registry import Registry
from fleetserve.protocol import Heartbeat, Registration, WorkerLoad


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def _worker(
    worker_id: str, device: str = "cuda", running: int = 0, **extra: object
) -> Registration:
    fields: dict[str, object] = {
        "worker_id": worker_id,
        "model_names": ["base"],
        "base_url": "http://h:1/v1",
        "engine": "vllm",
        "capacity": 8,
        "device": device,
        "max_adapters": 1,
        "max_lora_rank": 16,
        "load": WorkerLoad(running=running),
        **extra,
    }
    return Registration.model_validate(fields)


def _beat(worker_id: str, adapters: list[str], **extra: object) -> Heartbeat:
    fields = {"worker_id": worker_id, "load": WorkerLoad(), "adapters": adapters, **extra}
    return Heartbeat.model_validate(fields)


def _adapter(name: str, base: str = "base") -> DeclaredModel:
    return DeclaredModel(name=name, replicas=0, base=base, source=f"/adapters/{name}")


@pytest.fixture
def registry() -> Registry:
    registry = Registry(expiry_after_s=6, warmup_s=0, clock=Clock())
    registry.register(_worker("w1", running=3))
    registry.register(_worker("w2"))
    registry.declare(_adapter("a"))
    return registry


def test_many_demands_from_many_gateways_place_an_adapter_once(registry: Registry) -> None:
    for _ in range(5):
        assert registry.demand("a")
    orders = {w: registry.adapter_orders(w).load_adapters for w in ("w1", "w2")}
    assert orders == {"w1": [], "w2": [orders["w2"][0]]}  # the least loaded replica
    assert orders["w2"][0].source == "/adapters/a"
    # once registered there, it is routed there and nothing is loaded again
    assert registry.heartbeat("w2", WorkerLoad(), _beat("w2", ["a"]))
    assert registry.adapter_orders("w2").load_adapters == []
    registry.demand("a")
    assert registry.adapter_orders("w1").load_adapters == []
    assert registry.adapter_loads["a"] == 1 and registry.adapter_timed_loads["a"] == 1
    assert [m.registered_on for m in registry.models() if m.name == "a"] == [["w2"]]


def test_a_removed_adapter_is_unloaded_and_a_failed_load_says_so(registry: Registry) -> None:
    registry.demand("a")
    registry.heartbeat("w2", WorkerLoad(), _beat("w2", ["a"]))
    assert registry.undeclare("a")
    assert registry.adapter_orders("w2").unload_adapters == ["a"]
    registry.declare(_adapter("b"))
    registry.demand("b")
    registry.heartbeat("w2", WorkerLoad(), _beat("w2", [], adapter_errors={"b": "it failed"}))
    (view,) = [m for m in registry.table().models if m.name == "b"]
    assert view.note == "it failed" and view.base == "base"
    assert registry.adapter_unloads["a"] == 1


def test_on_cpu_one_replica_is_kept_free_of_adapters_for_the_base() -> None:
    cpu = [_worker("w1", "cpu"), _worker("w2", "cpu")]
    first = place(cpu, {})
    assert first == "w1"
    # w2 is the last replica taking base requests: the next adapter goes to w1, over its cap
    assert place(cpu, {"w1": 1}) == "w1"
    cpu[0].base_requests = False  # (w1 registered its adapter)
    assert place(cpu, {}) == "w1"
    gpu = [_worker("w1"), _worker("w2")]
    assert place(gpu, {"w1": 1}) == "w2"  # GPUs: room first
    assert place([_worker("w1", "cpu")], {}) == "w1"  # one replica: it serves both
    assert place([_worker("w1", max_adapters=0)], {}) is None


def test_adapters_that_cannot_be_served_are_refused(registry: Registry) -> None:
    assert "neither declared nor served" in str(registry.adapter_conflict(_adapter("x", "nope")))
    assert "adapter itself" in str(registry.adapter_conflict(_adapter("x", "a")))
    assert "already used by `base`" in str(registry.adapter_conflict(_adapter("base")))
    registry.register(_worker("w3", model_names=["gguf"], engine="llamacpp"))
    assert "llama.cpp adapters are not supported" in str(
        registry.adapter_conflict(_adapter("x", "gguf"))
    )
    registry.register(_worker("w4", model_names=["plain"], max_adapters=0))
    assert "without LoRA" in str(registry.adapter_conflict(_adapter("x", "plain")))
    assert registry.adapter_conflict(_adapter("fine")) is None


def test_a_replica_that_stops_taking_base_requests_is_routed_no_more_of_them(
    registry: Registry,
) -> None:
    version = registry.version
    registry.heartbeat("w2", WorkerLoad(), _beat("w2", [], base_requests=False))
    assert registry.version > version
    (w2,) = [w for w in registry.table().workers if w.worker_id == "w2"]
    assert w2.base_requests is False
