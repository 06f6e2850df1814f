#!/usr/bin/env bash
# Fresh machine -> the default pipeline end to end: set up .venv, then `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
python -m flows check   # params and upstream artifacts, before dvc repro removes any output
dvc repro "$@"
cat data/evaluate/report.md   # the results table; `dvc metrics show` has every figure
