"""The controller's settings (`fleetserve controller`, the cluster file's ``controller:``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from fleetserve import constants
from fleetserve.config import (
    HeaderTimeout,
    MaxConnections,
    MaxHeaderBytes,
    Strict,
    TlsCertFile,
    TlsKeyFile,
    check_tls_pair,
)


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
        check_tls_pair(self.tls_cert_file, self.tls_key_file)
        if self.expiry_after_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"expiry_after_s ({self.expiry_after_s}) must be longer than "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        return self
