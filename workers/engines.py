"""Engines a worker can run, registered by name.

An engine knows how to start its OpenAI-compatible server as a command line;
the agent (agent.py) does the rest: readiness, registration, load, drain. Each
engine lives with its own files: ``workers/vllm/``, ``workers/llamacpp/``,
``workers/fake/``; importing this module registers them all.
"""

from __future__ import annotations

import os
from typing import ClassVar

from fleetserve.config import Device, WorkerSettings
from fleetserve.registry import Registered


class Engine(Registered):
    """Base class; engines register with ``class X(Engine, name="x")``."""

    kind = "engine"
    #: Concurrent requests the engine runs when not told otherwise.
    default_capacity: ClassVar[int] = 256
    #: True when the engine runs on GPUs (or, on vLLM's CPU build, on bound cores).
    uses_accelerator: ClassVar[bool] = False
    #: True when the engine can publish its KV-cache events (workers/kvevents.py).
    publishes_kv_events: ClassVar[bool] = False

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        #: Where to publish KV-cache events (``publishes_kv_events`` engines; the agent sets it).
        self.kv_events_config: str | None = None

    @classmethod
    def resolve_source(cls, source: str) -> str:
        """The model to load for ``source`` (made or looked up if need be); ConfigError if none.

        Called before anything starts, by the worker and by `fleetserve up` (placement reads
        the model's files).
        """
        return source

    def prepare(self) -> None:
        """Once before the first start: settle the model to load."""
        self.settings.source = self.resolve_source(self.settings.source)

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    @classmethod
    def check_installed(cls) -> None:
        """Raise ConfigError, saying what to install, if this engine is not installed."""

    @classmethod
    def check_device(cls, device: Device | None) -> None:
        """Raise ConfigError if this installation cannot run on ``device``."""

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def capacity(self) -> int:
        return self.default_capacity

    def kv_events_wanted(self) -> bool:
        """The agent should have the engine publish KV events: it can, and the user neither
        set where (``--kv-events-config``) nor turned prefix caching off."""
        args = self.settings.engine_args
        return (
            self.publishes_kv_events
            and self._flag("--kv-events-config") is None
            and "--no-enable-prefix-caching" not in args
        )

    def _flag(self, *flags: str) -> str | None:
        """The value of the first of ``flags`` in the user's engine args, if given."""
        args = self.settings.engine_args
        for i, arg in enumerate(args):
            for flag in flags:
                if arg == flag and i + 1 < len(args):
                    return args[i + 1]
                if arg.startswith(flag + "="):
                    return arg.split("=", 1)[1]
        return None


# Each module registers its engines when imported; they import Engine from above.
from workers.fake import engine as _fake  # noqa: E402
from workers.llamacpp import engine as _llamacpp  # noqa: E402
from workers.vllm import engine as _vllm  # noqa: E402

__all__ = ["Engine", "_fake", "_llamacpp", "_vllm"]
