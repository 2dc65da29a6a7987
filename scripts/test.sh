#!/usr/bin/env bash
# Set up a virtualenv in .venv, install pilothandshake with its test tools,
# then run every check CI runs: lint, format, types, tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
# pip's own chatter (build warnings) goes to a log, shown only if the install fails.
if ! .venv/bin/python -m pip install --disable-pip-version-check -e '.[test]' \
    > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "scripts/test.sh: installing the package failed (log above)" >&2
    exit 1
fi
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff check"; ruff check pilothandshake tests benchmarks bin fuzz scripts
echo "== ruff format --check"; ruff format --check pilothandshake tests benchmarks bin fuzz scripts
echo "== mypy --strict pilothandshake"; mypy --strict pilothandshake
echo "== pytest"; pytest -q "$@"
