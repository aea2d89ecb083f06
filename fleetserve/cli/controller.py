"""`fleetserve controller`: run the controller (the worker registry)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from fleetserve.cli.args import add_settings_arguments, settings_from
from fleetserve.config import ControllerSettings

logger = logging.getLogger("fleetserve")


def serve(app: Any, host: str, port: int, graceful_s: float, **options: Any) -> None:
    """Run an ASGI app with uvicorn (uvloop and httptools: its [standard] extra)."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # fleetserve reads no X-Forwarded-*: skip that middleware
        server_header=False,
        timeout_graceful_shutdown=int(graceful_s),
        **options,
    )


def cmd_controller(args: argparse.Namespace) -> int:
    from controller.api import build_app

    settings: ControllerSettings = settings_from(ControllerSettings, args)
    logger.info("controller listening on http://%s:%d", settings.host, settings.port)
    # Its only long requests are gateways' long-polls, which retry: no need to wait for them.
    serve(build_app(settings), settings.host, settings.port, graceful_s=1)
    return 0


def register(sub: Any) -> None:
    controller = sub.add_parser("controller", help="Run the controller (the worker registry).")
    add_settings_arguments(controller, ControllerSettings)
    controller.set_defaults(func=cmd_controller)
