#!/bin/sh
# Mutation testing (pyproject.toml [tool.mutmut]): mutate manager/decide.py, manager/auth.py
# and store/journal.py, run their fast tests against every mutant, list the mutants not
# killed and print the score (killed + timed out = detected). Needs mutmut:
# pip install -e '.[mutation]'.
set -eu
cd "$(dirname "$0")/.."
[ -x .venv/bin/mutmut ] && PATH="$PWD/.venv/bin:$PATH"
rm -rf mutants
mutmut run >/dev/null 2>&1 || true
mutmut results --all true > mutants.txt
grep -vE ": killed$" mutants.txt || true
killed=$(grep -cE ": killed$" mutants.txt || true)
# A mutant that makes a test loop forever is detected too (mutmut's own score counts it).
timeout=$(grep -cE ": timeout$" mutants.txt || true)
total=$(grep -cE ": [a-z ]+$" mutants.txt || true)
echo "mutation score: $((killed + timeout)) detected of $total mutants ($killed killed, $timeout timed out)"
