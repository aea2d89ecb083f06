"""Declared models on the controller's API: from its models file at start, and declared or
taken back at run time, with the cluster token only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.api import build_app
from controller.settings import ControllerSettings
from fleetserve.cli.controller import declared_models
from fleetserve.errors import ConfigError

pytestmark = pytest.mark.anyio

TOKEN = "t0ken-for-the-test"


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A controller with a token, whose models file declares two models."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    models = tmp_path / "cluster.yaml"
    models.write_text(
        "models:\n"
        "  - {name: a, engine: fake, replicas: 2, fallbacks: [b]}\n"
        "  - {name: b, aliases: [bee], engine: fake}\n"
    )
    settings = ControllerSettings(cluster_token_file=str(token), models_file=str(models))
    transport = httpx.ASGITransport(app=build_app(settings, declared_models(settings)))
    async with httpx.AsyncClient(transport=transport, base_url="http://controller") as client:
        yield client


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_the_models_file_declares_its_models_from_the_start(
    controller: httpx.AsyncClient,
) -> None:
    states = (await controller.get("/models", headers=AUTH)).json()
    assert [(m["name"], m["declared"], m["replicas"], m["state"]) for m in states] == [
        ("a", True, 2, "starting"),
        ("b", True, 1, "starting"),
    ]
    routes = (await controller.get("/workers", headers=AUTH)).json()  # the table, sans secrets
    by_name = {m["name"]: m for m in routes["models"]}
    assert by_name["a"]["fallbacks"] == ["b"] and by_name["b"]["aliases"] == ["bee"]


async def test_declaring_at_run_time_needs_the_cluster_token(
    controller: httpx.AsyncClient,
) -> None:
    body = {"name": "c", "replicas": 1}
    assert (await controller.put("/models/c", json=body)).status_code == 401
    assert (await controller.delete("/models/a")).status_code == 401
    assert (await controller.get("/models")).status_code == 401
    mismatch = await controller.put("/models/d", json=body, headers=AUTH)
    assert mismatch.status_code == 400 and "'c'" in mismatch.json()["error"]["message"]
    typo = await controller.put("/models/c", json={**body, "replicsa": 1}, headers=AUTH)
    assert typo.status_code == 400  # internal messages forbid unknown fields
    assert (await controller.put("/models/c", json=body, headers=AUTH)).status_code == 200
    assert (await controller.delete("/models/a", headers=AUTH)).status_code == 200
    names = [m["name"] for m in (await controller.get("/models", headers=AUTH)).json()]
    assert names == ["b", "c"]
    gone = await controller.delete("/models/a", headers=AUTH)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_a_bad_models_file_stops_the_controller_before_it_starts(tmp_path: Path) -> None:
    models = tmp_path / "cluster.yaml"
    models.write_text("models:\n  - {name: a, replicas: 0}\n")
    with pytest.raises(ConfigError, match=r"models\[0\]\.replicas"):
        declared_models(ControllerSettings(models_file=str(models)))


async def test_declared_models_states_are_metrics(controller: httpx.AsyncClient) -> None:
    text = (await controller.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    state = "fleetserve_controller_declared_model_state"
    assert samples[(state, (("model", "a"), ("state", "starting")))] == 1
    assert samples[(state, (("model", "a"), ("state", "ready")))] == 0
    replicas = "fleetserve_controller_declared_model_replicas"
    assert samples[(replicas, (("kind", "wanted"), ("model", "a")))] == 2
    assert samples[(replicas, (("kind", "ready"), ("model", "a")))] == 0
