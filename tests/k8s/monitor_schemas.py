"""Strict JSON schemas for the Prometheus operator's ServiceMonitor, PodMonitor, PrometheusRule.

kubernetes-validate knows only Kubernetes' own kinds, not CRDs. These schemas
cover the fields of monitoring.coreos.com/v1 that k8s/ uses, with the types of
the operator's API reference, and refuse any other field (a typo in a CRD is
otherwise silently ignored by the API server's pruning). Metadata and label
selectors are checked against Kubernetes' own definitions from
kubernetes-validate, so those parts are as strict as for built-in kinds.
"""

from __future__ import annotations

from typing import Any

K8S = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1."
# Prometheus durations: 30s, 1m30s, 500ms...
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$",
}
NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "any": {"type": "boolean"},
        "matchNames": {"type": "array", "items": {"type": "string"}},
    },
}


def _endpoint(port_field: str) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [port_field],
        "properties": {
            port_field: {"type": "string", "minLength": 1},
            "path": {"type": "string", "pattern": "^/"},
            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
            "interval": DURATION,
            "scrapeTimeout": DURATION,
            "honorLabels": {"type": "boolean"},
        },
    }


def _monitor(kind: str, spec_properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": {"$ref": K8S + "ObjectMeta"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": required,
                "properties": {
                    "selector": {"$ref": K8S + "LabelSelector"},
                    "namespaceSelector": NAMESPACE_SELECTOR,
                    "jobLabel": {"type": "string"},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    **spec_properties,
                },
            },
        },
    }


SCHEMAS = {
    "ServiceMonitor": _monitor(
        "ServiceMonitor",
        {
            "endpoints": {"type": "array", "minItems": 1, "items": _endpoint("port")},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
        },
        ["selector", "endpoints"],
    ),
    "PodMonitor": _monitor(
        "PodMonitor",
        {"podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _endpoint("port")}},
        ["selector", "podMetricsEndpoints"],
    ),
}

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
    "properties": {
        "record": {"type": "string", "minLength": 1},
        "alert": {"type": "string", "minLength": 1},
        "expr": {"type": "string", "minLength": 1},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
SCHEMAS["PrometheusRule"] = _monitor(
    "PrometheusRule",
    {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": DURATION,
                    "rules": {"type": "array", "items": _RULE},
                },
            },
        }
    },
    ["groups"],
)
# a PrometheusRule has no selector
del SCHEMAS["PrometheusRule"]["properties"]["spec"]["properties"]["selector"]
