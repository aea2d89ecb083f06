"""Configuration: one pydantic model per process, and the cluster file.

Field descriptions are the ``--help`` text of the matching CLI flags, so each
setting is documented once. Everything is validated before any process starts.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fleetserve import constants
from fleetserve.errors import ConfigError

if TYPE_CHECKING:
    from fleetserve.protocol import DeclaredModel

ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$", max_length=200)]
#: The name of a secret (an attached server's API key): an environment variable's suffix
#: (FLEETSERVE_SECRET_<name>) and a file name in a secrets directory.
SecretName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$", max_length=100)]
#: The engine whose workers attach a server someone else runs (workers/attached/).
ATTACHED_ENGINE = "openai"

# Settings of a model that the cluster file (ModelSpec) and `fleetserve worker` share.
Fallbacks = Annotated[
    list[ModelName],
    Field(
        default_factory=list,
        description="Models to send a request to, in order, when this one has no ready worker, "
        "every worker tried failed, or the engine answered 429/503.",
    ),
]
UpstreamModel = Annotated[
    str | None,
    Field(
        description="engine openai: the server's own name for the model, if not the served "
        "name (gateways rewrite `model` to it)."
    ),
]
UpstreamKey = Annotated[
    SecretName | None,
    Field(
        description="engine openai: the name S of the secret holding the server's API key, read "
        "from $FLEETSERVE_SECRET_S (or the file S in --secrets-dir) by the worker and by each "
        "gateway; the key itself never leaves the machine that has it."
    ),
]
Endpoints = Annotated[
    list[str],
    Field(
        default_factory=list,
        description="engine openai: the paths the server serves, where it publishes no "
        "/openapi.json (default: /v1/chat/completions and /v1/completions).",
    ),
]
Capacity = Annotated[
    int | None,
    Field(ge=1, description="Requests the engine runs at once (default: from its flags)."),
]
EngineArgValue = str | int | float | bool

#: Validation context keys of the registered names, given by the callers that own the
#: registries (the CLI: ``validation_context()`` there). Without them names are not checked
#: here; the services check them where they look them up.
ENGINES = "engine"
ROUTING_POLICIES = "routing policy"


def _registered(kind: str) -> AfterValidator:
    def check(value: str | None, info: ValidationInfo) -> str | None:
        names = (info.context or {}).get(kind)
        if value is not None and names is not None and value not in names:
            raise ValueError(f"unknown {kind} {value!r}; choose one of {sorted(names)}")
        return value

    return AfterValidator(check)


#: None: the registry's default (``default=True`` where the engine or policy is defined).
EngineName = Annotated[str | None, _registered(ENGINES)]
PolicyName = Annotated[str | None, _registered(ROUTING_POLICIES)]


class Device(StrEnum):
    """What vLLM runs on. ``auto``: the GPUs when there are any, else vLLM's CPU build."""

    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"


class Load(StrEnum):
    """When a model's replicas run (`fleetserve up`)."""

    #: From the start, until the cluster stops.
    ALWAYS = "always"
    #: From the first request (held while they load) until idle_timeout_s without one.
    ON_DEMAND = "on_demand"


class Strict(BaseModel):
    """Configuration refuses unknown keys, so a typo fails loudly instead of being ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# -- Security and HTTP limits, shared by the processes that have them (fleetserve/auth.py,
# fleetserve/http.py). Paths only: a secret is never a command-line argument.
TlsCertFile = Annotated[
    str | None, Field(description="Serve HTTPS with this certificate (PEM; with --tls-key-file).")
]
TlsKeyFile = Annotated[str | None, Field(description="The certificate's private key (PEM).")]
CaFile = Annotated[
    str | None,
    Field(
        description="Trust the controller's certificate when this CA (PEM) signed it; default: "
        "the system's authorities."
    ),
]
ClientTokenFile = Annotated[
    str | None,
    Field(
        description="File with the cluster token to send to the controller (its first line); "
        "default: $FLEETSERVE_CLUSTER_TOKEN, else the token `fleetserve up` made on this machine."
    ),
]
HeaderTimeout = Annotated[
    float,
    Field(
        gt=0,
        description="Seconds a client has to send a request's line and headers; a silent or "
        "slow-loris connection is cut then.",
    ),
]
MaxHeaderBytes = Annotated[
    int, Field(ge=1024, description="Larger request headers are refused with 431.")
]
MaxConnections = Annotated[
    int,
    Field(
        ge=1,
        description="Connections held at once; past it the oldest idle one is closed to make "
        "room (at most half the open-files limit).",
    ),
]


SleepAfter = Annotated[
    float | None,
    Field(
        gt=0,
        description="Put the engine to sleep after this many seconds without a request "
        "(vLLM's sleep mode, GPUs only: frees the GPU memory, keeps the process, wakes in "
        "seconds when a gateway holds a request for the model). None: never.",
    ),
]

StartTimeout = Annotated[
    float,
    Field(
        gt=0,
        description="Seconds the engine has to load the model and answer (weights already on "
        "disk: `fleetserve model pull`, which a worker runs first); past it the engine is "
        "restarted. Kubernetes' rollout deadline is derived from it.",
    ),
]


def _check_tls_pair(cert: str | None, key: str | None) -> None:
    if bool(cert) != bool(key):
        raise ValueError("HTTPS needs both tls_cert_file and tls_key_file")


class ControllerSettings(Strict):
    host: str = Field(constants.DEFAULT_HOST, description="Address to listen on.")
    port: int = Field(constants.DEFAULT_CONTROLLER_PORT, ge=0, le=65535, description="Port.")
    heartbeat_interval_s: float = Field(
        constants.HEARTBEAT_INTERVAL_S, gt=0, description="Seconds between worker heartbeats."
    )
    expiry_after_s: float = Field(
        constants.EXPIRY_AFTER_S,
        gt=0,
        description="A worker silent for this many seconds is dropped from the routing table.",
    )
    cluster_token_file: str | None = Field(
        None,
        description="File with the cluster token(s) workers, gateways and `fleetserve status` "
        "must send, one per line (two while rotating); default: $FLEETSERVE_CLUSTER_TOKEN. "
        "Without a token the controller is open to anyone who reaches it: it refuses to "
        "listen on a non-loopback address then, unless --insecure.",
    )
    insecure: bool = Field(
        False,
        description="Listen on a non-loopback address without a cluster token: anyone who "
        "reaches the port can register workers (and receive their models' prompts).",
    )
    models_file: str | None = Field(
        None,
        description="A cluster file whose models should exist: gateways list them and hold "
        "their requests until a worker is ready (instead of 404), from the controller's start. "
        "More can be declared at run time (PUT /models/NAME, with the cluster token); those "
        "last until the controller restarts.",
    )
    tls_cert_file: TlsCertFile = None
    tls_key_file: TlsKeyFile = None
    header_timeout_s: HeaderTimeout = constants.HEADER_TIMEOUT_S
    max_header_bytes: MaxHeaderBytes = constants.MAX_HEADER_BYTES
    max_connections: MaxConnections = constants.MAX_CONNECTIONS

    @model_validator(mode="after")
    def _expiry_outlasts_heartbeat(self) -> ControllerSettings:
        _check_tls_pair(self.tls_cert_file, self.tls_key_file)
        if self.expiry_after_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"expiry_after_s ({self.expiry_after_s}) must be longer than "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        return self


def hash_key(key: str) -> str:
    """What a keys file keeps of a key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKey(Strict):
    """One API key. Only its SHA-256 is kept; `fleetserve key new` makes a key and its entry."""

    name: str = Field(min_length=1, max_length=100, description="Who holds the key (for logs).")
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, hex.")
    models: list[str] | None = Field(None, description="Models it may use; none: every model.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute; none: no limit.")
    tpm: int | None = Field(
        None, ge=1, description="Tokens (prompt + completion) per minute; none: no limit."
    )


class KeysFile(Strict):
    keys: list[ApiKey] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> KeysFile:
        seen: set[str] = set()
        for key in self.keys:
            if key.name in seen:
                raise ValueError(f"key name {key.name!r} is used twice")
            seen.add(key.name)
        return self


def load_keys_file(path: Path) -> list[ApiKey]:
    """Read a keys file (``keys: [{name, key_sha256, models, rpm}]``); ConfigError if invalid."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    try:
        return KeysFile.model_validate(data).keys
    except ValidationError as exc:
        raise ConfigError(f"{path} is invalid:\n{describe_validation_error(exc)}") from None


class GatewaySettings(Strict):
    host: str = Field(constants.DEFAULT_HOST, description="Address to listen on.")
    port: int = Field(constants.DEFAULT_GATEWAY_PORT, ge=0, le=65535, description="Port.")
    controller_url: str | None = Field(
        None, description="The controller's URL, e.g. http://10.0.0.5:8001."
    )
    max_body_bytes: int = Field(
        constants.MAX_BODY_BYTES, gt=0, description="Larger request bodies get 413."
    )
    max_audio_body_bytes: int = Field(
        constants.MAX_AUDIO_BODY_BYTES,
        gt=0,
        description="Larger audio uploads (/v1/audio/..., multipart) get 413.",
    )
    secrets_dir: str | None = Field(
        None,
        description="Directory of secret files (a Kubernetes Secret's mount): the API key of "
        "an attached server whose registration names secret S is the file S there, or else "
        "$FLEETSERVE_SECRET_S.",
    )
    processes: int = Field(
        1, ge=1, description="Gateway processes sharing the port, each watching the controller."
    )
    access_log: bool = Field(False, description="Log one JSON line per request.")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Refuse requests asking for more output tokens (400)."
    )
    request_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Give up (504) when a worker has not answered (streams: sent a first "
        "byte) within this long; the generation is aborted.",
    )
    drain_timeout_s: float = Field(
        constants.STOP_GRACE_S,
        gt=0,
        description="On SIGTERM, how long requests in flight (streams included) may go on "
        "before the gateway closes them; Kubernetes gives it the request timeout.",
    )
    hold_timeout_s: float = Field(
        constants.HOLD_TIMEOUT_S,
        ge=0,
        description="How long a request for a declared model with no ready worker (starting, "
        "restarting, scaled to zero) waits for one; then 503 with Retry-After (or the model's "
        "fallbacks). The wait counts toward request_timeout_s, which runs from the request's "
        "arrival: a request held 40 s has 40 s less for its answer, and the hold ends with the "
        "same 503 when request_timeout_s ends first. 0: no hold.",
    )
    stream_idle_timeout_s: float = Field(
        constants.STREAM_IDLE_TIMEOUT_S,
        gt=0,
        description="A stream whose worker sends nothing for this long counts as broken: it "
        "is resumed on another worker (or ends with an error event).",
    )
    max_resumes: int = Field(
        constants.MAX_RESUMES,
        ge=0,
        description="How many times one stream may be resumed on another worker after its "
        "worker failed mid-stream (0: never; the stream ends with an error event).",
    )
    retry_budget_ratio: float = Field(
        constants.RETRY_BUDGET_RATIO,
        ge=0,
        le=1,
        description="Retries and resumes allowed, as a fraction of the requests of the last "
        "10 s: a cluster whose workers all fail is not hit with several times its load.",
    )
    retry_budget_min_per_s: float = Field(
        constants.RETRY_BUDGET_MIN_PER_S,
        ge=0,
        description="Retries allowed per second beyond the budget's fraction (a quiet "
        "gateway may still retry).",
    )
    circuit_failures: int = Field(
        constants.CIRCUIT_FAILURES,
        ge=1,
        description="Failures in a row that open a worker's circuit (it gets no requests); "
        "a refused connection opens it at once.",
    )
    circuit_open_s: float = Field(
        constants.CIRCUIT_OPEN_S,
        gt=0,
        description="How long an open circuit keeps a worker out before one request probes "
        "it (doubled after each failed probe, up to 60 s); a successful probe closes it.",
    )
    keys_file: str | None = Field(
        None,
        description="YAML file of API keys, re-read when it changes and on SIGHUP. "
        "With no keys at all the gateway is open to anyone who reaches it.",
    )
    keys: list[ApiKey] = Field(
        default_factory=list, description="API keys written in the cluster file."
    )
    cluster_token_file: ClientTokenFile = None
    ca_file: CaFile = None
    tls_cert_file: TlsCertFile = None
    tls_key_file: TlsKeyFile = None
    header_timeout_s: HeaderTimeout = constants.HEADER_TIMEOUT_S
    max_header_bytes: MaxHeaderBytes = constants.MAX_HEADER_BYTES
    max_connections: MaxConnections = constants.MAX_CONNECTIONS
    routing_policy: PolicyName = Field(
        None,
        description="The policy for models whose workers name none (default: kv_events for "
        "models whose engines publish KV-cache events, else least_load).",
    )

    @model_validator(mode="after")
    def _one_source_of_keys(self) -> GatewaySettings:
        _check_tls_pair(self.tls_cert_file, self.tls_key_file)
        if self.keys and self.keys_file:
            raise ValueError("give API keys either inline (keys) or in a keys_file, not both")
        return self


class WorkerSettings(Strict):
    engine: EngineName = Field(None, description="Engine to run the model with.")
    source: str = Field(
        "",
        description="The model: a local path or a hub id.",
        json_schema_extra={"cli_aliases": ["--model"]},
    )
    served_name: ModelName = Field(description="The model name clients ask for.")
    aliases: list[ModelName] = Field(
        default_factory=list, description="More names for the same model."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs to shard the model over (tensor parallel, NCCL)."
    )
    pipeline_parallel_size: int = Field(
        1,
        ge=1,
        description="Pipeline stages (GPUs = TP x PP); with --nodes, one stage per node.",
    )
    device: Device = Field(
        Device.AUTO, description="Where vLLM runs; auto: the GPUs if any, else the CPU build."
    )
    nodes: list[str] = Field(
        default_factory=list,
        description="Node addresses of a replica spanning nodes, head first (repeat, or one "
        "comma/newline separated list); it runs on a Ray cluster that rank 0 starts.",
    )
    node_rank: int = Field(0, ge=0, description="This node's position in --nodes (0: the head).")
    ray_port: int = Field(
        constants.RAY_PORT,
        ge=1,
        le=65535,
        description="Port of the Ray head of a multi-node replica (its other ports, the "
        "dashboard's included, are picked free on each node).",
    )
    start_timeout_s: StartTimeout = constants.ENGINE_START_TIMEOUT_S
    sleep_after_s: SleepAfter = None
    controller_url: str = Field(
        f"http://{constants.DEFAULT_HOST}:{constants.DEFAULT_CONTROLLER_PORT}",
        description="The controller to register with.",
    )
    host: str = Field(
        constants.DEFAULT_HOST,
        description="Address gateways reach the engine at (through the worker's relay, which "
        "checks the engine's secret; the engine itself listens on a Unix socket).",
    )
    port: int = Field(0, ge=0, le=65535, description="The engine's port; 0 picks a free one.")
    advertise_host: str | None = Field(
        None, description="Address gateways use to reach the engine (default: --host)."
    )
    engine_args: list[str] = Field(
        default_factory=list, description="Extra engine flags (after `--` on the command line)."
    )
    routing_policy: PolicyName = Field(
        None, description="How gateways pick among this model's workers."
    )
    fallbacks: Fallbacks
    url: str | None = Field(
        None,
        description="engine openai: the OpenAI base URL of a server someone else runs (vLLM, "
        "SGLang, TGI, llama-server, Ollama, a hosted provider...), e.g. "
        "http://10.0.0.7:8000/v1; nothing is started, the worker watches it and registers it.",
    )
    upstream_model: UpstreamModel = None
    upstream_key: UpstreamKey = None
    secrets_dir: str | None = Field(
        None, description="Directory of secret files (see --upstream-key)."
    )
    endpoints: Endpoints
    capacity: Capacity = None
    ray_address: str | None = Field(
        None,
        description="Place the engine's ranks on this running Ray cluster (vLLM's Ray "
        "executor) instead of on this machine's GPUs: `fleetserve ray deploy` does this "
        "for models with pipeline stages.",
    )
    exit_when_engine_dies: bool = Field(
        False,
        description="Deregister and exit when the engine dies, instead of restarting it: "
        "for supervisors that replace replicas themselves (Ray Serve, Kubernetes).",
    )
    status_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the agent's own HTTP server on --host: /health (200 only while "
        "the engine is ready and registered: a readiness probe), /live, and /metrics (the "
        "agent's and the engine's); none: no server.",
    )
    cluster_token_file: ClientTokenFile = None
    ca_file: CaFile = None
    header_timeout_s: HeaderTimeout = constants.HEADER_TIMEOUT_S
    max_header_bytes: MaxHeaderBytes = constants.MAX_HEADER_BYTES
    max_connections: MaxConnections = constants.MAX_CONNECTIONS
    kv_events_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port on --host where the agent serves its engine's KV-cache events and "
        "tokenizer to gateways (engines that publish them: vllm), with the worker's secret; "
        "0: a free port. Fix it where a firewall or NetworkPolicy lists the ports gateways "
        "may reach.",
    )

    @field_validator("nodes", mode="before")
    @classmethod
    def _split_nodes(cls, value: Any) -> Any:
        # SKYPILOT_NODE_IPS is newline separated; accept that and commas as given.
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [n for item in value for n in re.split(r"[\s,]+", str(item)) if n]
        return value

    @model_validator(mode="after")
    def _url_with_attached_engine(self) -> WorkerSettings:
        _check_attached(self.engine, self.url, self.endpoints)
        return self

    @model_validator(mode="after")
    def _nodes_consistent(self) -> WorkerSettings:
        if self.nodes and self.node_rank >= len(self.nodes):
            raise ValueError(f"node_rank {self.node_rank} is not a position in nodes {self.nodes}")
        if len(self.nodes) > 1 and "pipeline_parallel_size" not in self.model_fields_set:
            self.pipeline_parallel_size = len(self.nodes)
        if self.nodes and self.pipeline_parallel_size % len(self.nodes):
            raise ValueError(
                f"pipeline_parallel_size {self.pipeline_parallel_size} does not split evenly "
                f"over {len(self.nodes)} nodes"
            )
        return self

    @property
    def stages_per_node(self) -> int:
        return self.pipeline_parallel_size // max(len(self.nodes), 1)

    @property
    def model_names(self) -> list[str]:
        return [self.served_name, *self.aliases]


def _check_attached(engine: str | None, url: str | list[str] | None, endpoints: list[str]) -> None:
    from fleetserve.protocol import ROUTED_PATHS

    if (engine == ATTACHED_ENGINE) != bool(url):
        raise ValueError(f"url goes with engine {ATTACHED_ENGINE!r}, and that engine needs a url")
    for path in endpoints:
        if path not in ROUTED_PATHS:
            raise ValueError(f"endpoint {path!r} is not one the gateway routes: {ROUTED_PATHS}")


class Autoscaling(Strict):
    """Replicas between bounds, following the load (`fleetserve ray deploy`, SkyServe)."""

    min_replicas: int = Field(
        1,
        ge=0,
        description="0: none while idle (`fleetserve ray deploy`): a held request starts one.",
    )
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float = Field(
        constants.TARGET_ONGOING_REQUESTS,
        gt=0,
        description="Running + waiting requests per replica to aim for.",
    )
    upscale_delay_s: float = Field(
        constants.UPSCALE_DELAY_S, ge=0, description="Load must stay high this long."
    )
    downscale_delay_s: float = Field(
        constants.DOWNSCALE_DELAY_S, ge=0, description="Load must stay low this long."
    )
    look_back_period_s: float = Field(
        constants.LOOK_BACK_PERIOD_S,
        gt=constants.RAY_METRICS_PUSH_INTERVAL_S,
        description="The load is averaged over this window (longer than the "
        f"{constants.RAY_METRICS_PUSH_INTERVAL_S:.0f} s between load reports).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is more than max_replicas "
                f"({self.max_replicas})"
            )
        return self


class GpuSelector(Strict):
    """Which GPUs a model's replicas need, beyond their count."""

    products: list[str] = Field(
        default_factory=list,
        description="Any of these GPU models, as NVIDIA's GPU feature discovery labels nodes "
        "(nvidia.com/gpu.product, e.g. NVIDIA-H100-80GB-HBM3); `fleetserve up` compares them "
        "with the names NVML gives, spaces read as dashes.",
    )
    min_memory_gib: float | None = Field(
        None,
        gt=0,
        description="At least this much memory per GPU (nvidia.com/gpu.memory, in MiB, on "
        "Kubernetes); cards report less than their name says: an 80 GB H100 has 79.6 GiB, "
        "so ask for 79.",
    )

    def matches(self, name: str, memory_bytes: int) -> bool:
        """True when a GPU called ``name`` (NVML's name) with ``memory_bytes`` qualifies."""
        wanted = {p.replace(" ", "-").lower() for p in self.products}
        if wanted and name.replace(" ", "-").lower() not in wanted:
            return False
        return self.min_memory_gib is None or memory_bytes >= self.min_memory_gib * 2**30


class ModelSpec(Strict):
    """One model of the cluster file and how to serve it.

    Every field is honoured or refused, by name, on each deployment target
    (fleetserve/targets.py): a new field must be classified there.
    """

    name: ModelName
    aliases: list[ModelName] = Field(default_factory=list)
    engine: EngineName = None
    source: str = Field("", description="Local path or hub id; the demo model if empty (vllm).")
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1)
    engine_args: dict[str, EngineArgValue] = Field(default_factory=dict)
    routing_policy: PolicyName = None
    fallbacks: Fallbacks
    url: list[str] | None = Field(
        None,
        description="engine openai: the OpenAI base URL of a server someone else runs, or a "
        "list of them (one replica each).",
    )
    upstream_model: UpstreamModel = None
    upstream_key: UpstreamKey = None
    endpoints: Endpoints
    capacity: Capacity = None
    autoscaling: Autoscaling | None = Field(
        None,
        description="Replicas between bounds on the running + waiting requests: Ray "
        "(`fleetserve ray deploy`) and Kubernetes (a KEDA ScaledObject, k8s/README.md).",
    )
    nodes: int = Field(
        1,
        ge=1,
        description="Nodes one replica spans (SkyPilot's cluster.yaml): its pipeline stages "
        "spread over them, tensor parallel inside each, through vLLM's Ray executor.",
    )
    gpu: GpuSelector | None = Field(None, description="Which GPUs, beyond how many.")
    start_timeout_s: StartTimeout = constants.ENGINE_START_TIMEOUT_S
    load: Load | None = Field(
        None,
        description="always, or on_demand: started on the first request, stopped after "
        "idle_timeout_s without one (`fleetserve up`). Default: the file's.",
    )
    idle_timeout_s: float | None = Field(
        None, gt=0, description="on_demand: stop after this long without a request."
    )
    sleep_after_s: SleepAfter = None

    @model_validator(mode="after")
    def _stages_split_over_nodes(self) -> ModelSpec:
        if self.pipeline_parallel_size % self.nodes:
            raise ValueError(
                f"pipeline_parallel_size {self.pipeline_parallel_size} does not split evenly "
                f"over {self.nodes} nodes (one or more whole stages per node)"
            )
        return self

    @field_validator("url", mode="before")
    @classmethod
    def _one_url_or_several(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _a_replica_per_url(self) -> ModelSpec:
        _check_attached(self.engine, self.url, self.endpoints)
        if self.url:
            if "replicas" in self.model_fields_set and self.replicas != len(self.url):
                raise ValueError(
                    f"replicas is {self.replicas} but {len(self.url)} url(s) are given: an "
                    "attached model has one replica per url"
                )
            if self.replicas != len(self.url):  # (an assignment validates the model again)
                self.replicas = len(self.url)
        return self

    def declaration(self) -> DeclaredModel:
        """The model as the controller declares it (it should exist, worker or not)."""
        from fleetserve.protocol import DeclaredModel

        return DeclaredModel(
            name=self.name,
            aliases=self.aliases,
            replicas=self.wanted_at_least(),
            routing_policy=self.routing_policy,
            fallbacks=self.fallbacks,
        )

    def wanted_at_least(self) -> int:
        """Replicas that should be ready however idle the model is: none on demand (until a
        request asks), the autoscaling minimum, else its replicas."""
        if self.load is Load.ON_DEMAND:
            return 0
        return self.replicas if self.autoscaling is None else self.autoscaling.min_replicas

    def engine_flags(self) -> list[str]:
        """``{max_num_seqs: 8, enforce_eager: true}`` -> ``--max-num-seqs 8 --enforce-eager``."""
        flags: list[str] = []
        for key, value in self.engine_args.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                flags.append(flag)
            elif value is not False:
                flags += [flag, str(value)]
        return flags


def engine_args_from_flags(flags: list[str]) -> dict[str, EngineArgValue]:
    """``--max-num-seqs 8 --enforce-eager`` -> ``{max_num_seqs: "8", enforce_eager: true}``."""
    args: dict[str, EngineArgValue] = {}
    i = 0
    while i < len(flags):
        flag = flags[i]
        if not flag.startswith("--"):
            raise ConfigError(f"engine flag expected, got {flag!r} (flags look like --name value)")
        key, equals, value = flag[2:].partition("=")
        if not equals:
            has_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            value = flags[i + 1] if has_value else ""
            i += has_value
        args[key.replace("-", "_")] = value if (equals or value) else True
        i += 1
    return args


class ClusterConfig(Strict):
    """The cluster file: every model, the controller and the gateway."""

    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    models: list[ModelSpec] = Field(min_length=1)
    load: Load = Field(
        Load.ALWAYS,
        description="Every model's load where it gives none: always, or on_demand (started "
        "on the first request, stopped after idle_timeout_s without one; `fleetserve up`).",
    )
    idle_timeout_s: float = Field(
        constants.IDLE_TIMEOUT_S,
        gt=0,
        description="on_demand models' idle timeout where they give none.",
    )

    @model_validator(mode="after")
    def _names_are_unique(self) -> ClusterConfig:
        for spec in self.models:  # each model says its own load (the file's, by default)
            if spec.load is None:  # (an attached server is someone else's to start)
                spec.load = Load.ALWAYS if spec.url else self.load
            if spec.idle_timeout_s is None:
                spec.idle_timeout_s = self.idle_timeout_s
            if spec.load is Load.ON_DEMAND and spec.url:
                raise ValueError(
                    f"model {spec.name!r}: load on_demand starts engines; an attached server "
                    "(url) is started by someone else"
                )
        owner: dict[str, str] = {}
        for spec in self.models:
            for name in [spec.name, *spec.aliases]:
                if name in owner:
                    what = "model name" if name == spec.name else "alias"
                    raise ValueError(
                        f"{what} {name!r} of model {spec.name!r} is already used by "
                        f"model {owner[name]!r}"
                    )
                owner[name] = spec.name
        for spec in self.models:
            for fallback in spec.fallbacks:
                if fallback not in owner or owner[fallback] == spec.name:
                    raise ValueError(
                        f"fallback {fallback!r} of model {spec.name!r} is not another model "
                        "of this cluster"
                    )
        return self


def describe_validation_error(error: ValidationError) -> str:
    """One readable line per problem: ``models[0].replicas: Input should be >= 1 (got 0)``."""
    lines = []
    for item in error.errors():
        where = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"]
        ).lstrip(".")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        got = "" if item["type"] in ("missing", "extra_forbidden") else f" (got {item['input']!r})"
        if item["type"] == "value_error" or isinstance(item["input"], dict):
            got = ""
        lines.append(f"{where or 'cluster file'}: {message}{got}")
    return "\n".join(lines)


def parse_cluster(
    data: Any, origin: str = "cluster file", context: dict[str, Any] | None = None
) -> ClusterConfig:
    """``context``: the registered names to check against (see ENGINES, ROUTING_POLICIES)."""
    try:
        return ClusterConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(f"{origin} is invalid:\n{describe_validation_error(exc)}") from None


def load_cluster_file(path: Path, context: dict[str, Any] | None = None) -> ClusterConfig:
    """Read and validate a cluster YAML file; raise ConfigError saying what is wrong."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'models' list at the top")
    return parse_cluster(data, origin=str(path), context=context)


def slug(text: str) -> str:
    """A name safe for ids and file names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
