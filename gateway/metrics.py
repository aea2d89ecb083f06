"""Prometheus metrics of one gateway process (a registry per app, no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fleetserve_gateway_requests",
            "Requests answered, by model and HTTP status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fleetserve_gateway_in_flight_requests",
            "Requests being proxied now.",
            registry=self.registry,
        )
        self.upstream_failures = Counter(
            "fleetserve_gateway_upstream_failures",
            "Upstream attempts that failed before the first byte (then retried elsewhere).",
            ["worker"],
            registry=self.registry,
        )
