"""What every process's settings share: the strict base, the field types two or more of
them declare (TLS and HTTP limits, the routing policy), the registered names' check, reading a
YAML file and describing a validation error.

Each process's settings live with it (controller/settings.py, gateway/settings.py,
workers/settings.py, which also has the field types of a model's settings that the cluster file
repeats); the cluster file, which gathers them, with the commands that read it
(fleetserve/cli/cluster.py). Field descriptions are the ``--help`` text of the matching CLI
flags, so each setting is documented once. Everything is validated before any process starts.
"""

from __future__ import annotations

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

#: Validation context keys of the registered names, given by the callers that own the
#: registries (the CLI: ``validation_context()`` there). Without them names are not checked
#: here; the services check them where they look them up.
ENGINES = "engine"
ROUTING_POLICIES = "routing policy"


def registered(kind: str) -> AfterValidator:
    def check(value: str | None, info: ValidationInfo) -> str | None:
        names = (info.context or {}).get(kind)
        if value is not None and names is not None and value not in names:
            raise ValueError(f"unknown {kind} {value!r}; choose one of {sorted(names)}")
        return value

    return AfterValidator(check)


#: None: the registry's default (``default=True`` where the policy is defined).
PolicyName = Annotated[str | None, registered(ROUTING_POLICIES)]


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


def check_tls_pair(cert: str | None, key: str | None) -> None:
    if bool(cert) != bool(key):
        raise ValueError("HTTPS needs both tls_cert_file and tls_key_file")


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
