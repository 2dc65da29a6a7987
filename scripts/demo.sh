#!/usr/bin/env bash
# Two-node trust handshake demo on loopback: an embedded registry and two daemons on free
# ports in a temporary directory, driven with the real pilot-handshakectl commands.
# Sets up .venv (if missing) and installs this checkout into it first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
# pip's own chatter (build warnings) goes to a log, shown only if the install fails.
if ! .venv/bin/python -m pip install --disable-pip-version-check -e . \
    > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "scripts/demo.sh: installing the package failed (log above)" >&2
    exit 1
fi
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pilothandshake.demo "$@"
