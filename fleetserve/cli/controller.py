"""`fleetserve controller`: run the controller (the worker registry)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from controller.protocol import DeclaredModel
from controller.settings import ControllerSettings
from fleetserve.auth import is_loopback
from fleetserve.cli.args import add_settings_arguments, settings_from, validation_context
from fleetserve.cli.cluster import load_cluster_file
from fleetserve.errors import ConfigError
from fleetserve.http import HttpLimits, serve

logger = logging.getLogger("fleetserve")


def cmd_controller(args: argparse.Namespace) -> int:
    from controller.api import build_app

    settings: ControllerSettings = settings_from(ControllerSettings, args)
    app = build_app(settings, declared_models(settings))
    if app.state.cluster_token is None:
        if not is_loopback(settings.host) and not settings.insecure:
            raise ConfigError(
                f"refusing to listen on {settings.host} without a cluster token: anyone who "
                "reaches the port could register a worker for any model and receive its "
                "prompts, or drain every worker. Give --cluster-token-file FILE (or "
                "$FLEETSERVE_CLUSTER_TOKEN), or --insecure to run it open anyway."
            )
        logger.warning(
            "NO CLUSTER TOKEN: anyone who reaches port %d can register and drain workers",
            settings.port,
        )
    scheme = "https" if settings.tls_cert_file else "http"
    logger.info("controller listening on %s://%s:%d", scheme, settings.host, settings.port)
    serve(
        app,
        host=settings.host,
        port=settings.port,
        limits=HttpLimits.of(settings),
        tls_cert_file=settings.tls_cert_file,
        tls_key_file=settings.tls_key_file,
        # Its only long requests are gateways' long-polls, which retry: no need to wait for them.
        graceful_s=1,
    )
    return 0


def declared_models(settings: ControllerSettings) -> list[DeclaredModel]:
    """The models of the controller's ``models_file`` (a cluster file), as it declares them;
    ConfigError for a bad file (before the controller starts)."""
    if not settings.models_file:
        return []
    cluster = load_cluster_file(Path(settings.models_file), context=validation_context())
    return [
        declared
        for spec in cluster.models
        for declared in (spec.declaration(), *spec.adapter_declarations())
    ]


def register(sub: Any) -> None:
    controller = sub.add_parser("controller", help="Run the controller (the worker registry).")
    add_settings_arguments(controller, ControllerSettings)
    controller.set_defaults(func=cmd_controller)
