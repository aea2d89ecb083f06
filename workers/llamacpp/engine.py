"""The llama.cpp engines for GGUF files: llama-server (C++, parallel slots) and llamacpp
(llama-cpp-python's server in Python, one request at a time)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import httpx

from fleetserve import paths
from fleetserve.errors import ConfigError
from fleetserve.protocol import CHAT, COMPLETIONS, RESPONSES
from workers.engines import Engine
from workers.llamacpp import source
from workers.llamacpp.python_server import cpu_has_amx


def resolve_gguf(model: str, cache_dir: Path | None = None) -> Path:
    """The GGUF file meant by ``model``: a path, a directory with one .gguf, or a cache name."""
    if not model:
        raise ConfigError(
            "the llamacpp engines need --source: a .gguf file or a name from "
            "`fleetserve model list`"
        )
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if (path / "config.json").is_file():
            raise ConfigError(
                f"{path} is a Hugging Face model; make a GGUF file of it first: "
                f"fleetserve model convert {path} --to gguf"
            )
        raise ConfigError(f"{path} holds {len(files)} .gguf files; name one of them")
    cached = (cache_dir or paths.models_dir()) / f"{model}.gguf"
    if cached.is_file():
        return cached
    raise ConfigError(f"no GGUF model {model!r}: not a file, and not in `fleetserve model list`")


class LlamaCppEngine(Engine, name="llamacpp"):
    """llama.cpp for one GGUF file: llama-cpp-python's OpenAI server (python_server.py).

    ``source`` is a .gguf file, a directory holding one, or the name of a file in the
    model cache (`fleetserve model list`). Engine args are llama-cpp-python's model
    settings: ``--n-ctx 2048 --n-threads 2 --n-gpu-layers 0``.
    """

    # llama-cpp-python's server generates for one request at a time; more wait for it.
    default_capacity = 1
    unix_socket = True

    @classmethod
    def resolve_source(cls, source: str) -> str:
        return str(resolve_gguf(source))

    def command(self, port: int) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "workers.llamacpp.python_server", "--model", s.source]
        cmd += ["--uds", self.socket] if self.socket else ["--host", s.host, "--port", str(port)]
        cmd += ["--served-name", *s.model_names]
        return cmd + s.engine_args

    @classmethod
    def check_installed(cls) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError(
                "the llamacpp engine needs llama-cpp-python: pip install 'fleetserve[llamacpp]' "
                "(compiles llama.cpp, a few minutes)"
            )


class LlamaServerEngine(LlamaCppEngine, name="llama-server"):
    """llama.cpp's own C++ server for one GGUF file: parallel slots, continuous batching.

    The same models as ``llamacpp``; engine args are llama-server's own flags, passed
    through: ``--parallel 4 --ctx-size 8192 --threads 8 --n-gpu-layers 99`` (the
    context is shared by the slots). scripts/setup.sh --llamacpp builds the server
    from llama-cpp-python's sources; one on PATH (Homebrew's, ...) serves too.
    """

    # llama-server's own default: --parallel -1 (auto) runs 4 slots.
    default_capacity = 4
    api_key_variable = "LLAMA_API_KEY"
    # (tools/server/server.cpp of the llama.cpp in llama-cpp-python 0.3.36)
    served_endpoints = (
        CHAT,
        COMPLETIONS,
        RESPONSES,
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/tokenize",
        "/detokenize",
    )

    async def endpoints(self, http: httpx.AsyncClient, engine_url: str) -> list[str]:
        """Embeddings and reranking where the flags that turn them on are given."""
        args = set(self.settings.engine_args)
        served = list(self.served_endpoints)
        if {"--embedding", "--embeddings"} & args:
            served.append("/v1/embeddings")
        if {"--reranking", "--rerank"} & args:
            served.append("/v1/rerank")
        return served

    def command(self, port: int) -> list[str]:
        s = self.settings
        cmd = [str(source.server_binary()), "--model", s.source]
        # llama-server listens on a Unix socket when its --host ends in .sock
        listen = ["--host", self.socket] if self.socket else ["--host", s.host, "--port", str(port)]
        cmd += ["--alias", s.model_names[0], *listen]
        cmd += ["--metrics", "--no-webui"]
        if cpu_has_amx():
            # quantized models crashed in llama.cpp's AMX kernels (0.3.36, Xeon with AMX)
            cmd.append("--no-repack")
        return cmd + s.engine_args

    def capacity(self) -> int:
        value = self._flag("--parallel", "-np")
        return int(value) if value and int(value) > 0 else self.default_capacity

    @classmethod
    def check_installed(cls) -> None:
        if source.server_binary() is None:
            raise ConfigError(
                "the llama-server engine needs llama.cpp's server: scripts/setup.sh --llamacpp "
                "builds it (a few minutes), or put a llama-server on PATH"
            )
