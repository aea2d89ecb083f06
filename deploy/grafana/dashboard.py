"""Writes fleetserve.json, the Grafana dashboard: `python deploy/grafana/dashboard.py`.

The dashboard is generated so that every panel has the same shape and each
query is written once, here; tests/deploy checks that every query parses and
names only metrics fleetserve exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RATE = "$__rate_interval"
MODEL = 'model=~"$model"'


def quantiles(metric: str, *qs: float) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{MODEL}}}[{RATE}])))",
            f"p{round(q * 100)}",
        )
        for q in qs
    ]


# (title, unit, [(query, legend)], description)
PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    (
        "Throughput",
        "reqps",
        [
            (
                f"sum by (model) (rate(fleetserve_gateway_requests_total{{{MODEL}}}[{RATE}]))",
                "{{model}}",
            )
        ],
        "Requests answered per second by the gateways, any status.",
    ),
    (
        "Tokens per second",
        "short",
        [
            (
                "sum by (model) (rate(fleetserve_gateway_completion_tokens_total"
                f"{{{MODEL}}}[{RATE}]))",
                "{{model}} out",
            ),
            (
                f"sum by (model) (rate(fleetserve_gateway_prompt_tokens_total{{{MODEL}}}[{RATE}]))",
                "{{model}} in",
            ),
        ],
        "Prompt (in) and completion (out) tokens, from the engines' usage reports.",
    ),
    (
        "Request latency",
        "s",
        quantiles("fleetserve_gateway_request_duration_seconds", 0.5, 0.95, 0.99),
        "Arrival at the gateway to the answer's last byte.",
    ),
    (
        "Time to first token",
        "s",
        quantiles("fleetserve_gateway_time_to_first_token_seconds", 0.5, 0.95, 0.99),
        "Streams: arrival to the first chunk going to the client.",
    ),
    (
        "Time per output token",
        "s",
        quantiles("fleetserve_gateway_time_per_output_token_seconds", 0.5, 0.99),
        "Streams: decode time per token after the first.",
    ),
    (
        "Gateway-added time",
        "s",
        quantiles("fleetserve_gateway_added_seconds", 0.5, 0.99),
        "The gateway's own time per request, engine time excluded.",
    ),
    (
        "In flight (gateways)",
        "short",
        [("sum(fleetserve_gateway_in_flight_requests)", "in flight")],
        "Requests being proxied now, all gateway replicas.",
    ),
    (
        "Engine queue per worker",
        "short",
        [
            (f"fleetserve_controller_worker_requests_waiting{{{MODEL}}}", "{{worker}} waiting"),
            (f"fleetserve_controller_worker_requests_running{{{MODEL}}}", "{{worker}} running"),
        ],
        "What each engine reported in its last heartbeat.",
    ),
    (
        "KV-cache use per worker",
        "percentunit",
        [(f"fleetserve_controller_worker_kv_cache_usage_ratio{{{MODEL}}}", "{{worker}}")],
        "Fraction of each engine's KV cache in use (last heartbeat).",
    ),
    (
        "Errors by status",
        "reqps",
        [
            (
                "sum by (model, status) (rate(fleetserve_gateway_requests_total"
                f'{{{MODEL}, status=~"[45].."}}[{RATE}]))',
                "{{model}} {{status}}",
            )
        ],
        "4xx: clients (keys, quotas, bad requests); 5xx: the cluster (502, 503, 504).",
    ),
    (
        "Upstream failures by worker",
        "short",
        [
            (
                f"sum by (worker) (increase(fleetserve_gateway_upstream_failures_total[{RATE}]))",
                "{{worker}} before first byte",
            ),
            (
                "sum by (worker) (increase("
                f"fleetserve_gateway_upstream_mid_stream_failures_total[{RATE}]))",
                "{{worker}} mid-stream",
            ),
            (
                f"sum by (model) (increase(fleetserve_gateway_retries_total{{{MODEL}}}[{RATE}]))",
                "{{model}} retries",
            ),
        ],
        "Failed attempts (retried on another worker) and broken streams.",
    ),
    (
        "Workers by state",
        "short",
        [(f"fleetserve_controller_workers{{{MODEL}}}", "{{model}} {{state}}")],
        "Registered workers, from the controller.",
    ),
    (
        "Engine restarts and missed heartbeats",
        "short",
        [
            (
                f"sum by (model, worker) (increase(fleetserve_worker_engine_restarts_total"
                f"{{{MODEL}}}[1h]))",
                "{{worker}} restarts (1h)",
            ),
            (
                "sum by (model) (increase(fleetserve_controller_heartbeats_missed_total"
                f"{{{MODEL}}}[1h]))",
                "{{model}} missed heartbeats (1h)",
            ),
        ],
        "A worker restarting its engine again and again is flapping.",
    ),
]


def panel(index: int, title: str, unit: str, targets: list[tuple[str, str]], doc: str) -> Any:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "description": doc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard() -> Any:
    return {
        "title": "fleetserve",
        "uid": "fleetserve",
        "description": "One OpenAI endpoint, many model workers: gateway and engine time apart.",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "tags": ["fleetserve", "llm"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                },
                {
                    "name": "model",
                    "type": "query",
                    "label": "Model",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(fleetserve_controller_workers, model)",
                    "definition": "label_values(fleetserve_controller_workers, model)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                },
            ]
        },
        "panels": [panel(i, *spec) for i, spec in enumerate(PANELS)],
    }


def main() -> None:
    path = Path(__file__).with_name("fleetserve.json")
    path.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
