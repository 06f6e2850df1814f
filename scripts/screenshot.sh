#!/usr/bin/env bash
# Screenshots for docs/: the evaluate stage's HTML report, and the MLflow UI's pages of the
# champion model version, the newest pipeline run and its train run's curves, in headless Chromium.
#   bash scripts/screenshot.sh [REPO]     (REPO: a repository after a run; default: this one)
# Needs chromium (Debian: apt-get install chromium; CHROME names another binary). The MLflow
# server it starts listens on 127.0.0.1 only and stops on exit.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
REPO="$(cd "${1:-$HERE}" && pwd)"
OUT="${OUT:-$HERE/docs}"
PORT="${PORT:-5077}"
PYTHON="${PYTHON:-$HERE/.venv/bin/python}"
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

shot() {  # URL WIDTH,HEIGHT FILE: scripts/screenshot.py waits for the page to draw
    "$PYTHON" "$HERE/scripts/screenshot.py" "$1" "$3" --size "$2" --wait "${WAIT:-10}"
}

shot "file://$REPO/data/evaluate/report.html" 1400,2000 "$OUT/report.png"

"$PYTHON" -m mlflow server --host 127.0.0.1 --port "$PORT" --workers 1 \
    --backend-store-uri "sqlite:///$REPO/mlflow.db" > /tmp/gradprune-screenshot-mlflow.log 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    sleep 1
done
# The champion version, the newest pipeline parent run and its train run, from the same store.
read -r VERSION EXPERIMENT RUN TRAIN < <(MLFLOW_TRACKING_URI="sqlite:///$REPO/mlflow.db" "$PYTHON" - <<'PY'
import warnings
warnings.filterwarnings("ignore")
from mlflow.tracking import MlflowClient
client = MlflowClient()
version = client.get_model_version_by_alias("gradprune-final", "champion")
experiment = client.get_experiment_by_name("gradprune").experiment_id
parent = client.search_runs([experiment], "tags.`gradprune.launcher` != 'standalone'",
                            order_by=["start_time DESC"], max_results=1)[0]
train = client.search_runs([experiment], "tags.`gradprune.stage` = 'train'",
                           order_by=["start_time DESC"], max_results=1)[0]
print(version.version, experiment, parent.info.run_id, train.info.run_id)
PY
)
URL="http://127.0.0.1:$PORT"
# The UI's GenAI / model-training switch is a browser setting; the query selects model training.
ML="workflowType=machine_learning"
shot "$URL/#/models/gradprune-final/versions/$VERSION?$ML" 1400,1400 "$OUT/mlflow_model_version.png"
shot "$URL/#/experiments/$EXPERIMENT/runs/$RUN?$ML" 1400,1100 "$OUT/mlflow_parent_run.png"
shot "$URL/#/experiments/$EXPERIMENT/runs/$TRAIN/model-metrics?$ML" 1400,1800 "$OUT/mlflow_train_curves.png"
