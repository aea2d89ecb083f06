"""The cluster file: every model, the controller and the gateway. `fleetserve up`,
`render k8s`, `ray deploy`, `model pull` and the controller's ``--models-file`` read it.

Every field is honoured or refused, by name, on each deployment target
(fleetserve/cli/targets.py).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from controller.protocol import DeclaredModel
from controller.settings import ControllerSettings
from fleetserve import constants
from fleetserve.adapters import DEFAULT_MAX_LORA_RANK, LORA_ENGINE
from fleetserve.config import PolicyName, Strict, describe_validation_error, read_yaml
from fleetserve.errors import ConfigError
from gateway.settings import GatewaySettings
from workers.settings import (
    Capacity,
    Endpoints,
    EngineArgValue,
    EngineName,
    Fallbacks,
    ModelName,
    SleepAfter,
    StartTimeout,
    UpstreamKey,
    UpstreamModel,
    check_attached,
)


class AdapterSpec(BaseModel):
    """One LoRA adapter of a model in the cluster file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$",
        max_length=200,
        description="The model name clients ask for.",
    )
    source: str = Field(
        min_length=1,
        description="The adapter's directory (peft's save_pretrained: adapter_config.json and "
        "its weights) on the disk of the base model's workers, or a hub id (org/name): pulled "
        "into the model cache first (`fleetserve up`, `fleetserve model pull -f`).",
    )
    aliases: list[str] = Field(
        default_factory=list,
        description="More names for the adapter (gateways rewrite them to its name).",
    )


class Load(StrEnum):
    """When a model's replicas run (`fleetserve up`)."""

    #: From the start, until the cluster stops.
    ALWAYS = "always"
    #: From the first request (held while they load) until idle_timeout_s without one.
    ON_DEMAND = "on_demand"


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
    (fleetserve/cli/targets.py): a new field must be classified there.
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
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        description="LoRA adapters of this model (engine vllm), each a model name of its own: "
        "registered with a replica's engine at run time where a request needs it "
        "(fleetserve/adapters.py).",
    )
    max_adapters_per_replica: int | None = Field(
        None,
        ge=1,
        description="Adapters one replica keeps registered at once; past it the least "
        "recently used idle one is unregistered to make room. Not vLLM's --max-loras (the "
        "adapters one batch mixes): vLLM swaps registered adapters through those slots. "
        f"Default: {constants.MAX_ADAPTERS_PER_REPLICA} for a model with adapters, else no "
        "LoRA (set it to add adapters at run time to a model that has none yet).",
    )
    max_lora_rank: int = Field(
        DEFAULT_MAX_LORA_RANK,
        ge=1,
        description="The largest LoRA rank the engine takes (vLLM's --max-lora-rank; its "
        "memory is reserved for it); larger adapters are refused before anything starts.",
    )

    @model_validator(mode="after")
    def _adapters_on_vllm(self) -> ModelSpec:
        if self.adapter_slots and (self.engine or LORA_ENGINE) != LORA_ENGINE:
            raise ValueError(
                f"model {self.name!r}: LoRA adapters are served by the vllm engine only "
                f"(llama.cpp's and other engines' adapters are not supported), not {self.engine}"
            )
        return self

    @property
    def adapter_slots(self) -> int:
        """Adapters a replica keeps registered; 0: its engine runs without LoRA."""
        if self.max_adapters_per_replica is not None:
            return self.max_adapters_per_replica
        return constants.MAX_ADAPTERS_PER_REPLICA if self.adapters else 0

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
        check_attached(self.engine, self.url, self.endpoints)
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

    def adapter_declarations(self) -> list[DeclaredModel]:
        """Its adapters as the controller declares them: models with this one as base."""
        return [
            DeclaredModel(
                name=a.name, aliases=a.aliases, replicas=0, base=self.name, source=a.source
            )
            for a in self.adapters
        ]

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
        for spec in self.models:  # adapters are model names too
            for adapter in spec.adapters:
                for name in [adapter.name, *adapter.aliases]:
                    if name in owner:
                        raise ValueError(
                            f"adapter {adapter.name!r} of model {spec.name!r}: the name "
                            f"{name!r} is already used by {owner[name]!r}"
                        )
                    owner[name] = adapter.name
        for spec in self.models:
            for fallback in spec.fallbacks:
                if fallback not in owner or owner[fallback] == spec.name:
                    raise ValueError(
                        f"fallback {fallback!r} of model {spec.name!r} is not another model "
                        "of this cluster"
                    )
        return self


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
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'models' list at the top")
    return parse_cluster(data, origin=str(path), context=context)
