"""What every process's settings share: the strict base, the field types two or more of
them declare (model names, TLS and HTTP limits, an attached server's fields), the registered
names' check, reading a YAML file and describing a validation error.

Each process's settings live with it (controller/settings.py, gateway/settings.py,
workers/settings.py); the cluster file, which gathers them, with the commands that read it
(fleetserve/cli/cluster.py). Field descriptions are the ``--help`` text of the matching CLI
flags, so each setting is documented once. Everything is validated before any process starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
)

from fleetserve.errors import ConfigError
from fleetserve.protocol import ROUTED_PATHS

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


def check_tls_pair(cert: str | None, key: str | None) -> None:
    if bool(cert) != bool(key):
        raise ValueError("HTTPS needs both tls_cert_file and tls_key_file")


def check_attached(engine: str | None, url: str | list[str] | None, endpoints: list[str]) -> None:
    if (engine == ATTACHED_ENGINE) != bool(url):
        raise ValueError(f"url goes with engine {ATTACHED_ENGINE!r}, and that engine needs a url")
    for path in endpoints:
        if path not in ROUTED_PATHS:
            raise ValueError(f"endpoint {path!r} is not one the gateway routes: {ROUTED_PATHS}")


def read_yaml(path: Path) -> Any:
    """The YAML file at ``path``; ConfigError saying why it cannot be read."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


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


def slug(text: str) -> str:
    """A name safe for ids and file names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
