#!/usr/bin/env bash
# Set up a virtualenv in .venv, install pilothandshake with its test tools, then run every
# check CI runs: lint, format, types and the whole test suite; and, at the same time, the
# unit suite (without tests/integration and tests/interop) on the lowest and the highest
# Python 3.9+ that pyenv has, each in its own virtualenv (.venv-X.Y), and the long
# fault-injection test beside the rest of the suite. Extra arguments go to pytest, and then
# only that one run happens (a targeted run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

# install VENV: the package with its test tools; pip's chatter (build warnings) goes to a
# log, shown only if the install fails.
install() {
    if ! "$1/bin/python" -m pip install --disable-pip-version-check -e '.[test]' \
        > "$1/install.log" 2>&1; then
        cat "$1/install.log" >&2
        echo "scripts/test.sh: installing the package into $1 failed (log above)" >&2
        exit 1
    fi
}

version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

# The lowest and the highest Python 3.9+ among pyenv's versions, one "X.Y PATH" a line.
other_pythons() {
    local root python version
    root=$(pyenv root 2> /dev/null) || root=${PYENV_ROOT:-$HOME/.pyenv}
    if [ ! -d "$root/versions" ]; then
        echo "== other Pythons: skipped (no pyenv: $root/versions does not exist)" >&2
        return
    fi
    for python in "$root"/versions/*/bin/python; do
        version=$(version_of "$python") || continue
        case $version in 2.* | 3.[0-8]) continue ;; esac  # older than the README promises
        echo "$version $python"
    done | sort -V -u -k1,1 | sed -n '1p;$p' | sort -V -u
}

if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
install .venv
main=$(version_of .venv/bin/python)

# Background runs, started first so that they run while the checks below do, each with
# its log (named in `logs`), and no pytest cache (which the runs would share); stopped if
# this script is: the unit suite on each other Python (its own venv and hypothesis
# database), and the fault-injection test (one long, mostly idle test) on this one.
labels=()
logs=()
pids=()
trap 'for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2> /dev/null || true; done' EXIT
background() {  # background LABEL LOG COMMAND...
    echo "== $1, in the background: $2"
    labels+=("$1")
    logs+=("$2")
    "${@:3}" > "$2" 2>&1 &
    pids+=($!)
}
CHAOS=tests/integration/test_chaos.py
if [ $# -gt 0 ]; then
    echo "== other Pythons and background runs: skipped (pytest arguments given: a targeted run)"
else
    versions=()
    while read -r version python; do
        if [ "$version" = "$main" ]; then
            echo "== Python $version: the whole suite runs on it below"
            continue
        fi
        venv=".venv-$version"
        # A venv whose interpreter is gone (pyenv upgraded it) is made again.
        if ! version_of "$venv/bin/python" > /dev/null; then
            rm -rf "$venv"
            "$python" -m venv "$venv"
        fi
        install "$venv"
        versions+=("$version")
    done < <(other_pythons)
    for version in ${versions[@]+"${versions[@]}"}; do
        venv=".venv-$version"
        background "pytest, unit suite (Python $version)" "$venv/pytest.log" \
            env HYPOTHESIS_STORAGE_DIRECTORY="$venv/hypothesis" "$venv/bin/python" -m pytest \
            -q -p no:cacheprovider --ignore=tests/integration --ignore=tests/interop
    done
    background "pytest $CHAOS (Python $main)" .venv/pytest-chaos.log \
        .venv/bin/python -m pytest -q -p no:cacheprovider "$CHAOS"
    set -- --ignore="$CHAOS"
fi

export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff check"; ruff check pilothandshake tests benchmarks bin fuzz scripts
echo "== ruff format --check"; ruff format --check pilothandshake tests benchmarks bin fuzz scripts
echo "== mypy --strict pilothandshake"; mypy --strict pilothandshake
echo "== pytest (Python $main)"
failed=0
pytest -q "$@" || failed=1

for i in ${pids[@]+"${!pids[@]}"}; do
    echo "== ${labels[$i]}"
    if wait "${pids[$i]}"; then
        tail -n 1 "${logs[$i]}"
    else
        tail -n 150 "${logs[$i]}"
        failed=1
    fi
done
exit $failed
