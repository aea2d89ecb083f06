"""`fleetserve gateway`: run a gateway (the OpenAI endpoint)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from fleetserve import env
from fleetserve.cli.args import add_settings_arguments, settings_from
from fleetserve.errors import ConfigError
from fleetserve.http import HttpLimits, serve
from gateway.settings import GatewaySettings

logger = logging.getLogger("fleetserve")


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.server import build_app

    settings: GatewaySettings = settings_from(GatewaySettings, args)
    if not settings.controller_url:
        raise ConfigError("--controller-url is required")
    logger.info(
        "gateway listening on %s://%s:%d/v1 (%d processes)",
        "https" if settings.tls_cert_file else "http",
        settings.host,
        settings.port,
        settings.processes,
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "limits": HttpLimits.of(settings),
        "tls_cert_file": settings.tls_cert_file,
        "tls_key_file": settings.tls_key_file,
        # Let streams in flight finish (workers drain before the gateway stops in `up`).
        "graceful_s": settings.drain_timeout_s,
    }
    if settings.processes == 1:
        serve(build_app(settings), **options)
        return 0
    # uvicorn's worker processes import the app by name and rebuild it from these settings.
    os.environ[env.GATEWAY_SETTINGS] = settings.model_dump_json()
    serve(
        "gateway.server:build_app_from_environment",
        factory=True,
        workers=settings.processes,
        **options,
    )
    return 0


def register(sub: Any) -> None:
    gateway = sub.add_parser("gateway", help="Run a gateway (the OpenAI endpoint).")
    add_settings_arguments(gateway, GatewaySettings, skip=("keys",))
    gateway.set_defaults(func=cmd_gateway)
