"""Engines a worker can run, registered by name.

An engine knows how to start its OpenAI-compatible server as a command line, and
which of the gateway's routes it serves; the agent (agent.py) does the rest:
readiness, registration, load, drain. Each engine lives with its own files:
``workers/vllm/``, ``workers/llamacpp/``, ``workers/fake/``, ``workers/attached/``
(a server someone else runs: nothing to start); importing this module registers
them all.
"""

from __future__ import annotations

import logging
import os
from typing import ClassVar

import httpx

from fleetserve.errors import ConfigError
from fleetserve.protocol import DEFAULT_ENDPOINTS, ROUTED_PATHS
from fleetserve.registry import Registered
from workers.settings import Device, WorkerSettings

logger = logging.getLogger(__name__)


async def openapi_endpoints(
    http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> list[str] | None:
    """The routed paths a server's /openapi.json at ``url`` lists (FastAPI servers: vLLM
    registers routes per task, so this is what the model serves); None if it has none."""
    try:
        response = await http.get(url, headers=headers)
        response.raise_for_status()
        paths = response.json()["paths"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        logger.info("no OpenAPI description at %s (%s)", url, exc or type(exc).__name__)
        return None
    return [path for path in ROUTED_PATHS if path in paths]


class Engine(Registered):
    """Base class; engines register with ``class X(Engine, name="x")``."""

    kind = "engine"
    #: Concurrent requests the engine runs when not told otherwise.
    default_capacity: ClassVar[int] = 256
    #: True when the engine runs on GPUs (or, on vLLM's CPU build, on bound cores).
    uses_accelerator: ClassVar[bool] = False
    #: True when the engine can listen on a Unix socket: the agent then puts it on one, behind
    #: its relay (workers/relay.py), so nothing reaches it without the worker's secret.
    unix_socket: ClassVar[bool] = False
    #: The environment variable that gives the engine an API key of its own (the secret).
    api_key_variable: ClassVar[str | None] = None
    #: True when a ``source`` of the form org/name is a Hugging Face hub model: the worker pulls
    #: it (workers/hub.py) before the engine starts.
    loads_hub_models: ClassVar[bool] = False
    #: True when its streams carry token ids and it continues from a token-id prompt exactly
    #: (``return_token_ids``): gateways resume streams that break on one such worker on another.
    token_ids: ClassVar[bool] = False
    #: The gateway's routes (fleetserve.protocol.ROUTED_PATHS) the engine serves.
    served_endpoints: ClassVar[tuple[str, ...]] = DEFAULT_ENDPOINTS
    #: True for a server someone else runs (workers/attached/): the agent starts nothing and
    #: watches it instead.
    attached: ClassVar[bool] = False
    #: True when the engine can publish its KV-cache events (workers/kvevents.py).
    publishes_kv_events: ClassVar[bool] = False
    #: True when the engine has vLLM's sleep mode (``POST /sleep``, ``/wake_up``): the agent
    #: puts it to sleep after ``sleep_after_s`` without a request (workers/sleep.py). Its
    #: routes are for the agent only: the relay refuses them to everyone (workers/relay.py).
    sleeps: ClassVar[bool] = False

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        #: The Unix socket to listen on (``unix_socket`` engines; the agent sets it).
        self.socket: str | None = None
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
        """The engine's command line: listening on ``self.socket`` if set, else on ``port``."""
        raise NotImplementedError

    @classmethod
    def check_installed(cls) -> None:
        """Raise ConfigError, saying what to install, if this engine is not installed."""

    @classmethod
    def check_device(cls, device: Device | None) -> None:
        """Raise ConfigError if this installation cannot run on ``device``."""

    @classmethod
    def check_sleep_mode(cls, device: Device | None) -> None:
        """Raise ConfigError if this engine cannot sleep (``sleep_after_s``) on ``device``."""
        if not cls.sleeps or not cls.unix_socket:  # (its sleep routes must be behind the relay)
            raise ConfigError(
                f"sleep_after_s: the {cls.name} engine has no sleep mode (vLLM on GPUs has)"
            )

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def capacity(self) -> int:
        return self.default_capacity

    def resumable(self) -> bool:
        """Streams it serves can be resumed on another worker of the model exactly."""
        return self.token_ids

    async def endpoints(self, http: httpx.AsyncClient, engine_url: str) -> list[str]:
        """The routes the running engine at ``engine_url`` serves (asked once it is ready)."""
        return list(self.served_endpoints)

    def request_headers(self) -> dict[str, str]:
        """Headers of the agent's own calls to the engine (an attached server's API key)."""
        return {}

    def health_url(self, engine_url: str) -> str:
        """What answers 200 while the engine at ``engine_url`` can serve."""
        return f"{engine_url}/health"

    def urls(self) -> tuple[str, str]:
        """An attached server's root URL (/metrics...) and OpenAI base URL (.../v1)."""
        raise NotImplementedError

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
from workers.attached import engine as _attached  # noqa: E402
from workers.fake import engine as _fake  # noqa: E402
from workers.llamacpp import engine as _llamacpp  # noqa: E402
from workers.vllm import engine as _vllm  # noqa: E402

__all__ = ["Engine", "_attached", "_fake", "_llamacpp", "_vllm"]
