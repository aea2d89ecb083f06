"""`GET /models/{name}/load`: what an autoscaler (KEDA's metrics-api scaler) reads, over HTTP.

The controller's real app in-process (httpx over ASGI), with a cluster token: the route is
guarded like every other but /health and /metrics.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from controller.api import build_app
from controller.settings import ControllerSettings
from tests.controller.test_registry import _worker

TOKEN = "load-test-cluster-token-0123456789"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_models_load_sums_its_workers_behind_the_cluster_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    app = build_app(ControllerSettings(cluster_token_file=str(token_file)))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://c", headers=headers) as c:
        for worker_id, model, running, waiting in (
            ("a", "m", 3, 1),
            ("b", "m", 2, 4),
            ("c", "o", 1, 0),
        ):
            registration = _worker(worker_id, model)
            (
                await c.post("/workers/register", json=registration.model_dump(mode="json"))
            ).raise_for_status()
            load = {"running": running, "waiting": waiting}
            beat = {"worker_id": worker_id, "load": load}
            (await c.post("/workers/heartbeat", json=beat)).raise_for_status()
        answer = await c.get("/models/m/load")
        assert answer.status_code == 200
        assert answer.json() == {
            "model": "m",
            "replicas": 2,
            "running": 5,
            "waiting": 5,
            "held": 0,
            "ongoing": 10,
        }
        unknown = await c.get("/models/nope/load")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
        anonymous = await c.get("/models/m/load", headers={"Authorization": ""})
        assert anonymous.status_code == 401


@pytest.mark.anyio
async def test_a_request_held_for_a_model_scaled_to_zero_counts_for_its_autoscaler() -> None:
    """What scales a worker Deployment up from zero (KEDA's minReplicaCount 0): a gateway holds
    a request for the declared model and tells the controller (POST .../demand)."""
    app = build_app(ControllerSettings(insecure=True))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://c") as c:
        name = "org/on-demand"  # a hub-style name: the route takes the slash
        declared = {"name": name, "replicas": 0}
        (await c.put(f"/models/{name}", json=declared)).raise_for_status()
        idle = (await c.get(f"/models/{name}/load")).json()
        assert (idle["replicas"], idle["held"], idle["ongoing"]) == (0, 0, 0)
        (await c.post(f"/models/{name}/demand")).raise_for_status()
        wanted = (await c.get(f"/models/{name}/load")).json()
        assert (wanted["replicas"], wanted["held"], wanted["ongoing"]) == (0, 1, 1)
