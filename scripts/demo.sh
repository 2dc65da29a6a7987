#!/usr/bin/env bash
# Two-node trust handshake demo on loopback: an embedded registry and two daemons on free
# ports in a temporary directory, driven with the real pilot-handshakectl commands.
# Sets up .venv (if missing) and installs this checkout into it first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pilothandshake.demo "$@"
