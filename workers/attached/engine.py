"""The openai engine: a server someone else runs, attached as a worker.

vLLM or SGLang started by hand, TGI, a llama-server, Ollama, LM Studio, llamafile:
any server with an OpenAI API (``--url``, its base URL). Nothing is started. The
agent watches the server instead of a process: it counts as up while
``GET <url>/models`` answers 200 (every OpenAI-compatible server has that route;
asked with the server's key when it has one), asked at start and on every
heartbeat. The worker registers while the server answers, deregisters at the
first heartbeat it does not, and registers again once it is back. Its load comes
from the server's Prometheus metrics where it has them (workers/load.py reads
vLLM's, SGLang's, TGI's and llama-server's names); without them the gateways'
own in-flight counts balance it.

The server's API key is named, not given: ``--upstream-key S`` reads it from
``$FLEETSERVE_SECRET_S`` (or the file S in ``--secrets-dir``), and the
registration carries only the name; each gateway reads the key from its own
environment the same way.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from fleetserve.errors import ConfigError
from fleetserve.protocol import DEFAULT_ENDPOINTS
from fleetserve.secrets import read_secret
from workers.engines import Engine, openapi_endpoints


class AttachedEngine(Engine, name="openai"):
    """A running OpenAI-compatible server at ``--url``; fleetserve starts nothing."""

    attached = True

    def prepare(self) -> None:
        s = self.settings
        assert s.url is not None  # (settings validation: engine openai needs a url)
        url = urlsplit(s.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"--url {s.url!r}: the server's OpenAI base URL, e.g. http://10.0.0.7:8000/v1"
            )
        self._key: str | None = None
        if s.upstream_key:
            self._key = read_secret(s.upstream_key, s.secrets_dir)
            if self._key is None:
                raise ConfigError(
                    f"the secret {s.upstream_key} (the server's API key) is not set: put the key "
                    f"in $FLEETSERVE_SECRET_{s.upstream_key}, or in the file {s.upstream_key} "
                    "of --secrets-dir"
                )

    def urls(self) -> tuple[str, str]:
        """The server's root (where /metrics and /openapi.json are) and its OpenAI base URL."""
        assert self.settings.url is not None
        base = self.settings.url.rstrip("/")
        return base.removesuffix("/v1"), base

    def health_url(self, engine_url: str) -> str:
        return f"{self.urls()[1]}/models"  # every OpenAI-compatible server has it

    def command(self, port: int) -> list[str]:
        raise NotImplementedError("an attached server is not started by fleetserve")

    def request_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def capacity(self) -> int:
        return self.settings.capacity or self.default_capacity

    async def endpoints(self, http: httpx.AsyncClient, engine_url: str) -> list[str]:
        """--endpoint if given, else the server's /openapi.json (vLLM, SGLang), else chat and
        completions."""
        if self.settings.endpoints:
            return list(self.settings.endpoints)
        found = await openapi_endpoints(http, f"{engine_url}/openapi.json", self.request_headers())
        return found or list(DEFAULT_ENDPOINTS)
