"""Secrets named by registrations (an attached server's API key), read where they are used.

A worker that attaches a server with a key registers only the secret's name; the
agent and every gateway read the key itself from their own environment
(``$FLEETSERVE_SECRET_<name>``) or from a file ``<name>`` in their secrets directory
(a Kubernetes Secret mounted as files), so it never travels in the routing table and
never reaches a log.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fleetserve import env

logger = logging.getLogger(__name__)


def read_secret(name: str, secrets_dir: str | Path | None = None) -> str | None:
    """The secret called ``name``: the file in ``secrets_dir`` first, then the environment."""
    if secrets_dir is not None:
        path = Path(secrets_dir) / name
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.error("cannot read secret %s from %s: %s", name, path, exc.strerror)
        else:
            if value:
                return value
    return env.secret(name)
