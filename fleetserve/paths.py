"""Every cache and log path, derived from one root.

The root is ``$FLEETSERVE_HOME``, else ``~/.cache/fleetserve``. Under it:
``models/`` (models fleetserve makes or converts: `fleetserve model list`),
``logs/`` (one directory per `fleetserve up`), ``llama.cpp/`` (llama.cpp's
sources and the llama-server build) and ``cluster-token`` (made by `fleetserve up`, 0600:
what this machine's fleetserve commands send to a controller when told no other token).
"""

from __future__ import annotations

from pathlib import Path

from fleetserve import env


def root() -> Path:
    return env.home() or Path.home() / ".cache" / "fleetserve"


def models_dir() -> Path:
    return root() / "models"


def logs_dir() -> Path:
    return root() / "logs"


def llamacpp_dir() -> Path:
    return root() / "llama.cpp"


def cluster_token_file() -> Path:
    return root() / "cluster-token"
