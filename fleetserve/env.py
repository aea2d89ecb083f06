"""Every environment variable fleetserve reads, read here and nowhere else.

Code asks these functions instead of ``os.environ``, so this page lists every knob
the environment can turn. (Children get a copy of the whole environment; copying
is not reading.)
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path

#: Root of fleetserve's caches and logs (default ~/.cache/fleetserve; see paths.py).
HOME = "FLEETSERVE_HOME"
#: The settings of `fleetserve gateway --processes N`, handed to each process as JSON.
GATEWAY_SETTINGS = "FLEETSERVE_GATEWAY_SETTINGS"
#: A llama.cpp source tree to use instead of the one in llama-cpp-python's archive.
LLAMACPP_SOURCE = "FLEETSERVE_LLAMACPP_SRC"
#: Extra CMake flags for building llama-server, e.g. ``-DGGML_CUDA=ON``.
LLAMA_SERVER_CMAKE_ARGS = "FLEETSERVE_LLAMA_SERVER_CMAKE_ARGS"
#: The API key of `fleetserve chat` and `fleetserve bench` (then OpenAI's own variable).
API_KEYS = ("FLEETSERVE_API_KEY", "OPENAI_API_KEY")
#: GPUs this process may use (CUDA's own variable, respected by placement).
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
#: Cores of vLLM's CPU build, one group per rank (vLLM's own variable; `up` sets it).
CPU_THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"
#: The cluster token (fleetserve/auth.py), when no --cluster-token-file gives it: one token, or
#: several separated by commas or whitespace (rotation; the first is the one sent).
CLUSTER_TOKEN = "FLEETSERVE_CLUSTER_TOKEN"
#: A worker's engine secret, instead of the fresh one it makes at start: for a router other
#: than fleetserve's gateways in front of the workers, which sends one key to every worker
#: (bench/routing.py gives it to sglang-router and vllm-router as their --api-key).
ENGINE_SECRET = "FLEETSERVE_ENGINE_SECRET"
#: Prefix of the secrets a registration may name (an attached server's API key): secret S is
#: $FLEETSERVE_SECRET_S. Only these: a registration can never make a gateway send any other
#: variable of its environment to an engine.
SECRET_PREFIX = "FLEETSERVE_SECRET_"


def home(environ: Mapping[str, str] = os.environ) -> Path | None:
    value = environ.get(HOME)
    return Path(value) if value else None


def gateway_settings(environ: Mapping[str, str] = os.environ) -> str:
    return environ[GATEWAY_SETTINGS]


def llamacpp_source(environ: Mapping[str, str] = os.environ) -> Path | None:
    value = environ.get(LLAMACPP_SOURCE)
    return Path(value) if value else None


def llama_server_cmake_args(environ: Mapping[str, str] = os.environ) -> list[str]:
    return shlex.split(environ.get(LLAMA_SERVER_CMAKE_ARGS, ""))


def api_key(environ: Mapping[str, str] = os.environ) -> str | None:
    return next((environ[name] for name in API_KEYS if environ.get(name)), None)


def cuda_visible_devices(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get(CUDA_VISIBLE_DEVICES)


def cluster_token(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get(CLUSTER_TOKEN) or None


def engine_secret(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get(ENGINE_SECRET) or None


def cpu_threads_bind(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get(CPU_THREADS_BIND)


def secret(name: str, environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get(SECRET_PREFIX + name) or None
