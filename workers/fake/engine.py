"""The fake engine: a synthetic OpenAI server (workers/fake/server.py) for tests and benchmarks."""

from __future__ import annotations

import sys

from fleetserve.protocol import CHAT, COMPLETIONS
from workers.engines import Engine


class FakeEngine(Engine, name="fake"):
    """Starts workers/fake/server.py; engine args are its flags (``--tokens-per-s 50``)."""

    unix_socket = True
    token_ids = True
    sleeps = True  # as vLLM's sleep mode (its routes and their effect), for tests on the CPU
    served_endpoints = (CHAT, COMPLETIONS, "/v1/audio/transcriptions", "/v1/audio/translations")

    def command(self, port: int) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "workers.fake.server"]
        cmd += ["--uds", self.socket] if self.socket else ["--host", s.host, "--port", str(port)]
        cmd += ["--sleep-mode"] if s.sleep_after_s is not None else []
        return [*cmd, "--served-name", *s.model_names, *s.engine_args]
