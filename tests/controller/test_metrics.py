"""The controller's metrics, read from a registry driven by hand: no network, no sleeping."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import RegistryCollector
from controller.registry import Registry
from fleetserve.protocol import WorkerLoad
from tests.controller.test_registry import Clock, _worker


def _samples(registry: Registry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    metrics = CollectorRegistry()
    metrics.register(RegistryCollector(registry))
    text = generate_latest(metrics).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _get(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_missed_heartbeats_count_each_silent_interval_then_the_expiry() -> None:
    clock = Clock()
    registry = Registry(expiry_after_s=3, warmup_s=0, clock=clock, heartbeat_interval_s=1)
    registry.register(_worker("a", "m"))
    registry.register(_worker("b", "m"))
    for _ in range(6):  # the controller checks twice per interval; b beats on time, a never
        clock.now += 0.5
        registry.heartbeat("b", WorkerLoad(running=2, waiting=1, kv_cache_usage=0.25))
        registry.expire()
    samples = _samples(registry)
    # a: silent 3 s; late (not missed) until 1.5 s, missed at 1.5 and 2.5 s
    assert _get(samples, "fleetserve_controller_heartbeats_missed_total", model="m") == 2
    assert _get(samples, "fleetserve_controller_heartbeats_total", model="m") == 6
    assert _get(samples, "fleetserve_controller_registrations_total", model="m") == 2
    assert (
        _get(samples, "fleetserve_controller_worker_requests_waiting", model="m", worker="b") == 1
    )
    clock.now += 0.6
    registry.heartbeat("b", WorkerLoad())
    assert registry.expire() == ["a"]
    samples = _samples(registry)
    assert _get(samples, "fleetserve_controller_expirations_total", model="m") == 1
    assert _get(samples, "fleetserve_controller_workers", model="m", state="ready") == 1
    assert (
        "fleetserve_controller_worker_requests_waiting",
        frozenset({("model", "m"), ("worker", "a")}),
    ) not in samples


def test_a_model_whose_last_worker_left_reads_zero_ready_workers() -> None:
    registry = Registry(expiry_after_s=3, warmup_s=0, clock=Clock())
    registry.register(_worker("a", "m"))
    registry.deregister("a")
    samples = _samples(registry)
    # an alert on "no ready worker" needs a zero here, not a series that vanished
    assert _get(samples, "fleetserve_controller_workers", model="m", state="ready") == 0
    assert _get(samples, "fleetserve_controller_workers", model="m", state="draining") == 0
