#!/usr/bin/env bash
# Set up (scripts/setup.sh --dev), then lint, type-check, check the layers and run the tests.
#
#   scripts/test.sh              everything (what CI runs)
#   scripts/test.sh --fast       the inner loop: no vLLM, Ray, llama.cpp or browser tests
#   scripts/test.sh -k gateway   extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
pytest_args=()
for arg in "$@"; do
    case "$arg" in
        # Three workers, each module on one (its fixtures start once): most of these tests wait
        # on processes starting. The whole run stays serial, the surest on a busy machine.
        --fast) pytest_args+=(-m "not vllm and not ray and not llamacpp and not browser"
                              -n 3 --dist loadscope) ;;
        *) pytest_args+=("$arg") ;;
    esac
done
scripts/setup.sh --dev
# One command per line: under `set -e` a failure on the left of `&&` would not stop the script.
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== import-linter (the layers: README, Layout)"
.venv/bin/lint-imports
echo "== pytest"
.venv/bin/python -m pytest ${pytest_args[@]+"${pytest_args[@]}"}
