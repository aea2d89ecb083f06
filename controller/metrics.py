"""Prometheus metrics of the controller, read from the registry at scrape time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from controller.registry import Registry
from fleetserve.protocol import WorkerState

#: The states a declared model can be in (fleetserve.protocol.model_state).
DECLARED_STATES = ("ready", "sleeping", "starting", "scaled_to_zero")


def _by_model(
    name: str, documentation: str, counts: Counter[str], models: set[str]
) -> CounterMetricFamily:
    """A counter by model, 0 for every model seen: rate() and increase() need the 0 to start."""
    family = CounterMetricFamily(name, documentation, labels=["model"])
    for model in sorted(models | set(counts)):
        family.add_metric([model], counts.get(model, 0))
    return family


class RegistryCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        registry = self._registry
        table = registry.table()
        by_model_state = Counter(
            (worker.model_names[0], worker.state.value) for worker in table.workers
        )
        workers = GaugeMetricFamily(
            "fleetserve_controller_workers",
            "Registered workers by served model name and state (0 for models seen before).",
            labels=["model", "state"],
        )
        models = registry.models_seen | {model for model, _ in by_model_state}
        for model in sorted(models):
            for state in WorkerState:
                workers.add_metric(
                    [model, state.value], by_model_state.get((model, state.value), 0)
                )
        yield workers
        yield GaugeMetricFamily(
            "fleetserve_controller_table_version", "Routing table version.", value=table.version
        )
        yield GaugeMetricFamily(
            "fleetserve_controller_warm",
            "1 once a restarted controller has given every live worker time to re-register.",
            value=1 if registry.warm else 0,
        )
        yield _by_model(
            "fleetserve_controller_registrations",
            "Worker registrations, re-registrations included.",
            registry.registrations_by_model,
            models,
        )
        yield _by_model(
            "fleetserve_controller_expirations",
            "Workers dropped for missing heartbeats.",
            registry.expirations_by_model,
            models,
        )
        yield _by_model(
            "fleetserve_controller_heartbeats",
            "Heartbeats received from known workers.",
            registry.heartbeats_by_model,
            models,
        )
        yield _by_model(
            "fleetserve_controller_heartbeats_missed",
            "Heartbeat intervals that passed without one from a registered worker.",
            registry.missed_heartbeats_by_model,
            models,
        )
        # The load each worker reported in its last heartbeat: queue and KV cache per worker.
        gauges = {
            "running": GaugeMetricFamily(
                "fleetserve_controller_worker_requests_running",
                "Requests the worker's engine is generating (last heartbeat).",
                labels=["model", "worker"],
            ),
            "waiting": GaugeMetricFamily(
                "fleetserve_controller_worker_requests_waiting",
                "Requests queued in the worker's engine (last heartbeat).",
                labels=["model", "worker"],
            ),
            "kv": GaugeMetricFamily(
                "fleetserve_controller_worker_kv_cache_usage_ratio",
                "Fraction of the worker engine's KV cache in use (last heartbeat).",
                labels=["model", "worker"],
            ),
            "age": GaugeMetricFamily(
                "fleetserve_controller_worker_heartbeat_age_seconds",
                "Seconds since the worker's last heartbeat.",
                labels=["model", "worker"],
            ),
        }
        for worker in table.workers:
            labels = [worker.model_names[0], worker.worker_id]
            gauges["running"].add_metric(labels, worker.load.running)
            gauges["waiting"].add_metric(labels, worker.load.waiting)
            gauges["kv"].add_metric(labels, worker.load.kv_cache_usage)
            gauges["age"].add_metric(labels, worker.last_heartbeat_age_s)
        yield from gauges.values()
        declared = GaugeMetricFamily(
            "fleetserve_controller_declared_model_state",
            "Declared models (they should exist): 1 for the state each is in (ready, "
            "starting, scaled_to_zero), 0 for the others; with the replicas wanted and ready.",
            labels=["model", "state"],
        )
        replicas = GaugeMetricFamily(
            "fleetserve_controller_declared_model_replicas",
            "Declared models' replicas: wanted (should be ready) and ready.",
            labels=["model", "kind"],
        )
        for state_of in registry.models():
            if not state_of.declared:
                continue
            for name in DECLARED_STATES:
                declared.add_metric([state_of.name, name], 1 if state_of.state == name else 0)
            replicas.add_metric([state_of.name, "wanted"], state_of.replicas)
            replicas.add_metric([state_of.name, "ready"], state_of.ready)
        yield declared
        yield replicas
        cold = SummaryMetricFamily(
            "fleetserve_controller_cold_start_seconds",
            "Declared models going from no replica to a ready one (start-up, on demand, "
            "after their last worker died): how many, and the seconds from wanting one "
            "(declared, or started on demand) to its registration.",
            labels=["model"],
        )
        for name in sorted(registry.cold_starts_by_model):
            cold.add_metric(
                [name],
                registry.cold_starts_by_model[name],
                registry.cold_start_seconds_by_model[name],
            )
        yield cold
        adapters = {m.name for m in registry.models() if m.base is not None}
        yield _by_model(
            "fleetserve_controller_adapter_loads",
            "LoRA adapters registered with a replica's engine (by adapter: the model label), as "
            "the replicas report them.",
            registry.adapter_loads,
            adapters,
        )
        yield _by_model(
            "fleetserve_controller_adapter_unloads",
            "LoRA adapters unregistered from a replica (least recently used at its cap, removed, "
            "or its engine restarted).",
            registry.adapter_unloads,
            adapters,
        )
        load_time = SummaryMetricFamily(
            "fleetserve_controller_adapter_load_seconds",
            "Placing a LoRA adapter on a replica until the replica reports it registered: the "
            "wait of the requests held for it.",
            labels=["model"],
        )
        for name in sorted(registry.adapter_load_seconds):
            load_time.add_metric(
                [name], registry.adapter_timed_loads[name], registry.adapter_load_seconds[name]
            )
        yield load_time
