#!/usr/bin/env bash
# Set up (scripts/setup.sh --dev), then lint, type-check and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k gateway -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
# One command per line: under `set -e` a failure on the left of `&&` would not stop the script.
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
