"""Wire schemas between workers, controller and gateways.

Internal messages forbid extra fields: a typo or a version skew fails loudly.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Internal(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerState(StrEnum):
    READY = "ready"
    DRAINING = "draining"


class WorkerLoad(Internal):
    """What a worker's engine reports about itself (read from its own /metrics)."""

    running: int = Field(0, ge=0, description="Requests being generated.")
    waiting: int = Field(0, ge=0, description="Requests queued in the engine.")
    kv_cache_usage: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of KV cache in use.")
    generated_tokens: int = Field(
        0, ge=0, description="Output tokens generated since the engine started (a counter)."
    )


class WorkerInfo(Internal):
    """What a worker is: shared by its registration and the controller's view of it."""

    worker_id: str = Field(min_length=1, max_length=200)
    model_names: list[str] = Field(min_length=1, description="Served name first, then aliases.")
    base_url: str = Field(description="The engine's OpenAI base URL, ending in /v1.")
    engine: str
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    device: str = Field("", description="cuda, cpu, or empty for an engine without one.")
    gpu_ids: list[int] = Field(default_factory=list, description="Physical GPU indices used.")
    nodes: int = Field(1, ge=1, description="Nodes the replica spans.")
    capacity: int = Field(ge=1, description="Requests the engine runs at once.")
    state: WorkerState = WorkerState.READY
    load: WorkerLoad = Field(default_factory=WorkerLoad)
    engine_secret: str | None = Field(
        None,
        repr=False,  # never in a log line or a traceback
        description="What gateways send the engine (Authorization: Bearer), which refuses "
        "every request without it. Registered and served to gateways only with the cluster "
        "token (/routes); blanked in every other view (/workers, `fleetserve status`).",
    )
    kv_events_url: str | None = Field(
        None,
        description="Where the worker's agent serves its engine's KV-cache events and "
        "tokenizer to gateways (workers/kvevents.py), with the engine's secret; None: the "
        "engine publishes none.",
    )


class Registration(WorkerInfo):
    routing_policy: str | None = Field(
        None,
        description="How gateways pick among the model's workers (None: the gateways' "
        "default). A property of the model: the newest registration's wins.",
    )


class RegistrationReply(Internal):
    heartbeat_interval_s: float


class Heartbeat(Internal):
    worker_id: str
    load: WorkerLoad


class HeartbeatReply(Internal):
    known: bool = Field(description="False: the controller does not know you; register again.")


class WorkerView(WorkerInfo):
    """A worker as the controller publishes it."""

    last_heartbeat_age_s: float


class ModelView(Internal):
    """A model (its served name: every worker's first name) as the controller publishes it."""

    name: str
    routing_policy: str | None = None


class RouteTable(Internal):
    """The routing table gateways watch. ``epoch`` changes when the controller restarts."""

    epoch: str
    version: int
    workers: list[WorkerView]
    models: list[ModelView] = Field(default_factory=list)
