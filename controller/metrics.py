"""Prometheus metrics of the controller, read from the registry at scrape time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.registry import Registry


class RegistryCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        table = self._registry.table()
        by_model_state = Counter(
            (worker.model_names[0], worker.state.value) for worker in table.workers
        )
        workers = GaugeMetricFamily(
            "fleetserve_controller_workers",
            "Registered workers by served model name and state.",
            labels=["model", "state"],
        )
        for (model, state), count in sorted(by_model_state.items()):
            workers.add_metric([model, state], count)
        yield workers
        yield GaugeMetricFamily(
            "fleetserve_controller_table_version", "Routing table version.", value=table.version
        )
        yield CounterMetricFamily(
            "fleetserve_controller_registrations",
            "Worker registrations, re-registrations included.",
            value=self._registry.registrations_total,
        )
        yield CounterMetricFamily(
            "fleetserve_controller_expirations",
            "Workers dropped for missing heartbeats.",
            value=self._registry.expirations_total,
        )
