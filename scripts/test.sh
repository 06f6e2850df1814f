#!/usr/bin/env bash
# Fresh machine -> the test suite: set up .venv, then pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# Two workers, a test file each (module and session fixtures stay within one worker): most
# integration tests wait on subprocesses that use one core, so two files at once fill both.
# The slowest tests are listed, so a suite creeping toward CI's budget shows where time goes.
python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
