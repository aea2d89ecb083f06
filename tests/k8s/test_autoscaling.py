"""Worker autoscaling on Kubernetes: KEDA ScaledObjects that follow the cluster file.

A model with ``autoscaling:`` has one ScaledObject on its worker Deployment whose bounds,
target and delays are the file's, reading the controller's ``/models/NAME/load`` (the
running + waiting requests over its workers: tests/controller/test_load.py) with the
cluster token; a model without has none. (The objects' schemas: test_manifests.)
"""

from __future__ import annotations

import httpx
import pytest

from tests.k8s.test_manifests import (
    OVERLAYS,
    component,
    named,
    of_kind,
    overlay_cluster,
    pod_labels,
    pod_spec,
    render,
    selects,
)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_scale_as_the_cluster_file_says(overlay: str) -> None:
    objs = render(overlay)
    cluster = overlay_cluster(overlay)
    workers = {pod_labels(d)["fleetserve.io/model"]: d for d in component(objs, "worker")}
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in of_kind(objs, "ScaledObject")}
    controller = named(objs, "Service", "fleetserve-controller")
    controller_port = controller["spec"]["ports"][0]["port"]
    for spec in cluster.models:
        deployment = workers[spec.name]["metadata"]["name"]
        scaling = spec.autoscaling
        if scaling is None:
            assert deployment not in scaled, spec.name
            continue
        so = scaled[deployment]["spec"]
        assert (so["minReplicaCount"], so["maxReplicaCount"]) == (
            scaling.min_replicas,
            scaling.max_replicas,
        )
        behavior = so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == scaling.upscale_delay_s
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == scaling.downscale_delay_s
        (trigger,) = so["triggers"]
        assert (trigger["type"], trigger["metricType"]) == ("metrics-api", "AverageValue")
        metadata = trigger["metadata"]
        assert float(metadata["targetValue"]) == scaling.target_ongoing_requests
        assert metadata["valueLocation"] == "ongoing"  # controller.protocol.ModelLoad
        url = httpx.URL(metadata["url"])
        assert (url.host, url.port) == (controller["metadata"]["name"], controller_port)
        assert url.path == f"/models/{spec.name}/load"
        # with the cluster token the controller reads
        assert metadata["authMode"] == "bearer"
        auth = named(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        (secret,) = auth["spec"]["secretTargetRef"]
        assert (secret["parameter"], secret["name"]) == ("token", "fleetserve-cluster-token")
        (controller_pod,) = component(objs, "controller")
        volumes = {v["name"]: v for v in pod_spec(controller_pod)["volumes"]}
        assert volumes["cluster-token"]["secret"]["secretName"] == secret["name"]
    assert set(scaled) <= {d["metadata"]["name"] for d in workers.values()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kedas_operator_may_reach_the_controller_where_workers_autoscale(overlay: str) -> None:
    objs = render(overlay)
    if not of_kind(objs, "ScaledObject"):
        return
    (controller,) = component(objs, "controller")
    keda = {"app.kubernetes.io/name": "keda-operator"}
    allowed = [
        peer
        for policy in of_kind(objs, "NetworkPolicy")
        if selects(policy["spec"]["podSelector"], pod_labels(controller))
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if "namespaceSelector" in peer and selects(peer["podSelector"], keda)
    ]
    assert allowed
