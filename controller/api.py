"""The controller's HTTP API.

``/models`` lists the models that should exist (declared: from ``models_file``, or
``PUT /models/NAME`` at run time; ``DELETE`` takes one back) with their state.

Every route but ``/health`` (for probes) and ``/metrics`` (for Prometheus) needs the cluster
token when the controller has one (fleetserve/auth.py): registering, heartbeats, drain and
deregistration, the gateways' ``/routes`` watch, the ``/workers`` view and the models' load
(``/models/{name}/load``, for autoscalers). Without it they
are 401 in the error envelope. ``/metrics`` stays open because Prometheus scrapes without
credentials in most setups, and it holds counts and names only: no address, secret or prompt
(the k8s NetworkPolicy limits who reaches it). ``/routes`` is the only answer holding the
engines' secrets (gateways need them); ``/workers`` leaves them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controller.metrics import RegistryCollector
from controller.protocol import DeclaredModel, ModelLoad, ModelState
from controller.registry import Registry
from controller.settings import ControllerSettings
from fleetserve import constants
from fleetserve.auth import server_token, unauthorized
from fleetserve.errors import OpenAIError, install_error_handlers
from fleetserve.protocol import (
    Heartbeat,
    HeartbeatReply,
    Registration,
    RegistrationReply,
    RouteTable,
)

logger = logging.getLogger(__name__)


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def build_app(settings: ControllerSettings, declared: Iterable[DeclaredModel] = ()) -> FastAPI:
    """The controller for ``settings``, with the models that should exist from its start
    (``declared``: `fleetserve controller` reads them from ``models_file``);
    ``app.state.cluster_token``: its token, None if open."""
    token = server_token(settings.cluster_token_file)
    registry = Registry(
        expiry_after_s=settings.expiry_after_s,
        warmup_s=settings.expiry_after_s,  # see constants.EXPIRY_AFTER_S
        heartbeat_interval_s=settings.heartbeat_interval_s,
    )
    for model in declared:
        registry.declare(model)
    metrics = CollectorRegistry()
    metrics.register(RegistryCollector(registry))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def expire_forever() -> None:
            while True:
                await asyncio.sleep(settings.heartbeat_interval_s / 2)
                registry.expire()

        task = asyncio.create_task(expire_forever())
        yield
        task.cancel()

    app = FastAPI(title="fleetserve controller", lifespan=lifespan)
    app.state.registry = registry
    app.state.cluster_token = token
    install_error_handlers(app)

    async def authenticated(request: Request) -> None:
        if token is not None and not token.verify(request.headers.get("authorization")):
            raise unauthorized(f"{request.method} {request.url.path}")

    api = APIRouter(dependencies=[Depends(authenticated)])

    def unknown(worker_id: str) -> OpenAIError:
        return OpenAIError(404, f"worker {worker_id!r} is not registered", code="worker_unknown")

    @api.post("/workers/register")
    async def register(registration: Registration, request: Request) -> RegistrationReply:
        _registry(request).register(registration)
        return RegistrationReply(heartbeat_interval_s=settings.heartbeat_interval_s)

    @api.post("/workers/heartbeat")
    async def heartbeat(beat: Heartbeat, request: Request) -> HeartbeatReply:
        registry = _registry(request)
        if not registry.heartbeat(beat.worker_id, beat.load, beat):
            return HeartbeatReply(known=False)
        orders = (
            registry.adapter_orders(beat.worker_id)
            if beat.adapters is not None
            else HeartbeatReply(known=True)
        )
        return orders.model_copy(update={"wake": registry.wakes(beat.worker_id)})

    @api.post("/workers/{worker_id}/drain")
    async def drain(worker_id: str, request: Request) -> dict[str, str]:
        if not _registry(request).drain(worker_id):
            raise unknown(worker_id)
        return {"status": "draining"}

    @api.delete("/workers/{worker_id}")
    async def deregister(worker_id: str, request: Request) -> dict[str, str]:
        if not _registry(request).deregister(worker_id):
            raise unknown(worker_id)
        return {"status": "deregistered"}

    @api.get("/models")
    async def models(request: Request) -> list[ModelState]:
        """Every model: declared, served, or kept for its fallbacks, with its state."""
        return _registry(request).models()

    @api.put("/models/{name:path}")
    async def declare(name: str, model: DeclaredModel, request: Request) -> dict[str, str]:
        """``name`` should exist: gateways hold its requests until a worker is ready."""
        if model.name != name:
            raise OpenAIError(400, f"the body declares {model.name!r}, the path {name!r}")
        registry = _registry(request)
        conflict = registry.adapter_conflict(model) if model.base is not None else None
        if conflict is not None:
            raise OpenAIError(400, f"adapter `{name}`: {conflict}", code="invalid_adapter")
        registry.declare(model)
        return {"status": "declared"}

    @api.post("/models/{name:path}/demand")
    async def demand(name: str, request: Request) -> dict[str, str]:
        """A gateway holds a request for ``name`` with no replica wanted (start one) or with
        its workers asleep (wake them)."""
        if not _registry(request).demand(name):
            raise OpenAIError(
                404, f"model {name!r} is neither declared nor asleep", code="model_not_found"
            )
        return {"status": "noted"}

    @api.delete("/models/{name:path}")
    async def undeclare(name: str, request: Request) -> dict[str, str]:
        if not _registry(request).undeclare(name):
            raise OpenAIError(404, f"model {name!r} is not declared", code="model_not_found")
        return {"status": "undeclared"}

    @api.get("/workers")
    async def workers(request: Request) -> RouteTable:
        return _registry(request).table().without_secrets()

    @api.get("/routes", response_model=RouteTable, responses={204: {"description": "No change"}})
    async def routes(
        request: Request,
        epoch: str = "",
        after: int = -1,
        timeout_s: float = Query(constants.WATCH_TIMEOUT_S, ge=0, le=300),
    ) -> RouteTable | Response:
        """Long-poll the routing table: answers once it is newer than (epoch, after), else 204."""
        table = await _registry(request).wait_for_change(epoch, after, timeout_s)
        return table if table is not None else Response(status_code=204)

    @api.get("/models/{name:path}/load")
    async def model_load(name: str, request: Request) -> ModelLoad:
        """Requests running, waiting and held for the model: what its autoscaler reads
        (Kubernetes: KEDA's metrics-api scaler, k8s/README.md). 404 for a model neither
        declared nor served."""
        load = _registry(request).model_load(name)
        if load is None:
            raise OpenAIError(
                404,
                f"model {name!r} is neither declared nor served",
                code="model_not_found",
                param="name",
            )
        return load

    app.include_router(api)

    @app.get("/health")
    async def health(request: Request) -> dict[str, object]:
        registry = _registry(request)
        return {"status": "ok", "warm": registry.warm, "workers": len(registry.table().workers)}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app
