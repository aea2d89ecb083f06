"""The gateway's settings (`fleetserve gateway`, the cluster file's ``gateway:``) and its
API keys (a keys file, or inline)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from fleetserve import constants
from fleetserve.config import (
    CaFile,
    ClientTokenFile,
    HeaderTimeout,
    MaxConnections,
    MaxHeaderBytes,
    PolicyName,
    Strict,
    TlsCertFile,
    TlsKeyFile,
    check_tls_pair,
    describe_validation_error,
    read_yaml,
)
from fleetserve.errors import ConfigError


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
    data = read_yaml(path) or {}
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
        check_tls_pair(self.tls_cert_file, self.tls_key_file)
        if self.keys and self.keys_file:
            raise ValueError("give API keys either inline (keys) or in a keys_file, not both")
        return self
