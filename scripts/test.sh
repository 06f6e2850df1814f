#!/usr/bin/env bash
# Fresh machine -> the test suite: set up .venv, then pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# The slowest tests, so a suite creeping toward CI's budget shows where the time goes.
python -m pytest -q --durations=15 "$@"
