#!/usr/bin/env bash
# Set up a virtualenv in .venv, install pilothandshake with its test tools,
# then run every check CI runs: lint, format, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
export PATH="$PWD/.venv/bin:$PATH"
ruff check pilothandshake tests benchmarks bin
ruff format --check pilothandshake tests benchmarks bin
mypy --strict pilothandshake
pytest -q "$@"
