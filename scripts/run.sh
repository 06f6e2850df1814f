#!/usr/bin/env bash
# Fresh machine -> the default pipeline end to end: set up .venv, then `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
python -m flows check   # params and upstream artifacts, before dvc repro removes any output
dvc repro "$@"
cat data/evaluate/report.md   # the results table; `dvc metrics show` has every figure
echo
gradprune table               # the comparison that matters, in under 120 columns
cat <<'NEXT'

Where to look next:
  report   data/evaluate/report.html (self-contained: table and plots)
  plots    dvc plots show, then open dvc_plots/index.html (offline PNGs)
  MLflow   .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
           then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning: experiment
           "gradprune" (runs, per-step loss curves) and the registered model
           gradprune-final@champion (mlflow.pyfunc.load_model("models:/gradprune-final@champion"))
  exports  .venv/bin/gradprune export   (HF folder with model card, sparse file, GGUF in exports/)
NEXT
