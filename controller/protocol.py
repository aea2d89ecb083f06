"""The controller's own API, which its clients read (the CLI, the Ray package, KEDA) and no
other service does: declared models (``PUT /models/NAME``, the models file), the models'
states (``GET /models``) and loads (``GET /models/NAME/load``). What workers and gateways
exchange with the controller is fleetserve/protocol.py."""

from __future__ import annotations

from pydantic import Field

from fleetserve.protocol import Internal


class DeclaredModel(Internal):
    """A model that should exist, whether or not a worker serves it yet: the cluster file's
    (the controller's ``models_file``), or one declared at run time (``PUT /models/NAME``).

    Gateways hold a request for a declared model with no ready worker until one is ready
    (starting, restarting), where an undeclared one would be 404.
    """

    name: str = Field(min_length=1, max_length=200)
    aliases: list[str] = Field(default_factory=list)
    replicas: int = Field(1, ge=0, description="Replicas that should be ready.")
    routing_policy: str | None = None
    fallbacks: list[str] = Field(default_factory=list)
    note: str = Field(
        "",
        max_length=500,
        description="What starts the replicas says about them (one that exited): clients "
        "read it in the 503 that ends a hold, so no path or secret.",
    )
    base: str | None = Field(
        None,
        description="A LoRA adapter's base model: the adapter is served by the base's "
        "replicas that registered it (loaded at run time, where the controller places it).",
    )
    source: str = Field(
        "", description="An adapter's directory, on the disk of the base's workers."
    )


class ModelState(Internal):
    """A model as ``GET /models`` and `fleetserve status` show it."""

    name: str
    declared: bool
    replicas: int = Field(description="Replicas that should be ready (declared models).")
    ready: int = Field(description="Replicas ready now.")
    state: str = Field(description="See fleetserve.protocol.model_state().")
    base: str | None = Field(None, description="A LoRA adapter's base model.")
    registered_on: list[str] = Field(
        default_factory=list, description="An adapter: the workers that have it registered."
    )
    demand_age_s: float | None = Field(
        None,
        description="Seconds since a gateway last held a request for it with none of its "
        "replicas wanted (scaled to zero): the signal to start one. None: never.",
    )


class ModelLoad(Internal):
    """A model's requests in flight over its workers: what an autoscaler reads (KEDA's
    metrics-api scaler, `valueLocation: ongoing`), from `GET /models/{name}/load`."""

    model: str
    replicas: int = Field(description="Its registered workers, draining ones included.")
    running: int
    waiting: int
    held: int = Field(
        description="1 while a gateway may still hold a request for it with no replica wanted "
        "(it asked within the gateways' default hold_timeout_s): scales it from zero."
    )
    ongoing: int = Field(description="running + waiting + held.")
