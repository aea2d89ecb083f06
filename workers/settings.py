"""A worker's settings (`fleetserve worker`; `fleetserve up` makes them from the cluster
file's models) and the engine flags they carry."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from fleetserve import constants
from fleetserve.adapters import DEFAULT_MAX_LORA_RANK
from fleetserve.config import (
    ENGINES,
    CaFile,
    ClientTokenFile,
    HeaderTimeout,
    MaxConnections,
    MaxHeaderBytes,
    PolicyName,
    Strict,
    registered,
)
from fleetserve.errors import ConfigError
from fleetserve.protocol import ROUTED_PATHS

# -- Field types of a model's settings that the cluster file's models repeat
# (fleetserve/cli/cluster.py ModelSpec): declared once, here.
ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$", max_length=200)]
#: The name of a secret (an attached server's API key): an environment variable's suffix
#: (FLEETSERVE_SECRET_<name>) and a file name in a secrets directory.
SecretName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$", max_length=100)]
#: The engine whose workers attach a server someone else runs (workers/attached/).
ATTACHED_ENGINE = "openai"

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


def check_attached(engine: str | None, url: str | list[str] | None, endpoints: list[str]) -> None:
    if (engine == ATTACHED_ENGINE) != bool(url):
        raise ValueError(f"url goes with engine {ATTACHED_ENGINE!r}, and that engine needs a url")
    for path in endpoints:
        if path not in ROUTED_PATHS:
            raise ValueError(f"endpoint {path!r} is not one the gateway routes: {ROUTED_PATHS}")


def slug(text: str) -> str:
    """A name safe for ids and file names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


#: None: the registry's default (``default=True`` where the engine is defined).
EngineName = Annotated[str | None, registered(ENGINES)]


class Device(StrEnum):
    """What vLLM runs on. ``auto``: the GPUs when there are any, else vLLM's CPU build."""

    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"


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
    max_adapters: int = Field(
        0,
        ge=0,
        description="LoRA adapters this replica keeps registered at once (the model's "
        "max_adapters_per_replica); the controller places them, the engine starts with "
        "--enable-lora. 0: no LoRA.",
    )
    max_lora_rank: int = Field(
        DEFAULT_MAX_LORA_RANK, ge=1, description="With --max-adapters: the largest LoRA rank."
    )
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
        check_attached(self.engine, self.url, self.endpoints)
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
