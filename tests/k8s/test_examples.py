"""k8s/examples/: the endpoint behind an Ingress or a Gateway API route, validated strictly.

The Ingress against Kubernetes' own schema (kubernetes-validate, strict); the HTTPRoute
against the CRD's schema vendored from its release (tests/k8s/crds/, the file names the
version), made strict as kubernetes-validate makes the built-in ones: a field the schema
does not know is an error. Then what streaming needs: no whole-request deadline shorter
than a generation, no buffering, and the gateway's Service and port.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.k8s.test_manifests import (
    ROOT,
    component,
    container_settings,
    named,
    pod_spec,
    render,
    validate,
)

EXAMPLES = ROOT / "k8s" / "examples"


def _example(name: str) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return obj


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_is_valid(name: str) -> None:
    assert validate(_example(name)) is None


def test_strict_validation_catches_a_typo() -> None:
    route = copy.deepcopy(_example("httproute.yaml"))
    route["spec"]["rules"][0]["timeout"] = route["spec"]["rules"][0].pop("timeouts")
    assert validate(route) is not None
    ingress = copy.deepcopy(_example("ingress-nginx.yaml"))
    ingress["spec"]["ingressClass"] = ingress["spec"].pop("ingressClassName")
    assert validate(ingress) is not None


def _gateway_service() -> dict[str, Any]:
    return named(render("gpu"), "Service", "fleetserve-gateway")


def test_the_route_sends_every_path_to_the_gateway_without_cutting_streams() -> None:
    (rule,) = _example("httproute.yaml")["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    service = _gateway_service()
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"] in {port["port"] for port in service["spec"]["ports"]}
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    # a stream lasts as long as the generation: no whole-request deadline ("0s": none)
    assert rule["timeouts"] == {"request": "0s", "backendRequest": "0s"}


def test_the_ingress_streams_unbuffered_and_waits_as_long_as_the_gateway() -> None:
    ingress = _example("ingress-nginx.yaml")
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    (gateway,) = component(render("gpu"), "gateway")
    settings = container_settings(pod_spec(gateway)["containers"][0])
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(notes[prefix + timeout]) >= settings.request_timeout_s
    assert notes[prefix + "proxy-body-size"] == f"{settings.max_body_bytes // 2**20}m"
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = _gateway_service()
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
